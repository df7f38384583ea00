"""Load, create and save EDiT banks."""
import os

import folder_paths

from ..edit_core.bank import (DEFAULT_DESIGN, LEGACY_HPARAMS, MAX_QKV_RANK, EDiTError, bank_file_stem, default_hparam,
                               init_bank, load_bank, parse_layer_selection, save_bank, select_layers)
from ..edit_core.comfyui.model import model_spec
from .folders import EDIT_FOLDER, edit_folder

BANK = "EDIT_BANK"
# Said by the widgets whose default is DEFAULT_DESIGN's.
DESIGN_NOTE = (" The default is the design the fidelity study picked (docs/fidelity.md); banks made before it: "
               + ", ".join(f"{key} {LEGACY_HPARAMS[key]}" for key in DEFAULT_DESIGN) + ".")


def check_layer_selection(layers):
    """VALIDATE_INPUTS for a layer selection: True, or the message that rejects the prompt
    before anything runs (the layers themselves are checked against the bank or model later)."""
    try:
        parse_layer_selection(layers)
    except EDiTError as e:
        return str(e)
    return True


class EDiTLoader:
    DESCRIPTION = "Loads EDiT weights (a bank of per-layer EDiT modules) from models/edit."
    CATEGORY = "EDiT/loaders"
    RETURN_TYPES = (BANK,)
    RETURN_NAMES = ("edit_bank",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"edit_name": (folder_paths.get_filename_list(EDIT_FOLDER), {
            "tooltip": "An EDiT bank (.safetensors) in models/edit, made by EDiT Distill + Save EDiT."})}}

    def load(self, edit_name):
        return (load_bank(folder_paths.get_full_path_or_raise(EDIT_FOLDER, edit_name)),)


class EDiTInitFromModel:
    DESCRIPTION = ("Builds an untrained EDiT bank for a model: the starting point of distillation. Untrained EDiT "
                   "is ReLU linear attention over the model's own q/k/v and is far from the original: distill it.")
    CATEGORY = "EDiT/loaders"
    RETURN_TYPES = (BANK,)
    RETURN_NAMES = ("edit_bank",)
    FUNCTION = "init"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD3/SD3.5 or PixArt-Sigma model."}),
            "layers": ("STRING", {"default": "all", "tooltip":
                                  "Which attention layers to convert: 'all' (or blank), or block indices/ranges "
                                  "such as '0-12' or '0-12:attn2' (SD3.5 MMDiT-X image attention only)."}),
            "reduction": ("INT", {"default": default_hparam("reduction"), "min": 1, "max": 1024, "tooltip":
                                  "ConvFusion channel reduction r (hidden channels = width / r). 32 keeps the "
                                  "branch under 4% of a block's dense compute."}),
            "eta_mode": (["learned", "ratio"], {"default": default_hparam("eta_mode"), "tooltip":
                                                "Hybrid attention mix: token ratio N/(N+M), with a learned per-head "
                                                "offset ('learned') or fixed ('ratio')."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
        }, "optional": {  # the student design (issue 11); the defaults: DEFAULT_DESIGN
            "cf_kernel": ("INT", {"default": default_hparam("cf_kernel"), "min": 0, "max": 15, "tooltip":
                                  "ConvFusion kernel size (odd); 0: no ConvFusion (q~ = ReLU(q))."}),
            "sc_kernel": ("INT", {"default": default_hparam("sc_kernel"), "min": 1, "max": 15, "tooltip":
                                  "k/v compressor kernel size (odd)." + DESIGN_NOTE}),
            "sc_stride": ("INT", {"default": default_hparam("sc_stride"), "min": 1, "max": 2, "tooltip":
                                  "k/v compressor stride: 2 (4x fewer keys) or 1; 1 with sc_kernel 1: no compression."
                                  + DESIGN_NOTE}),
            "local_kernel": ("INT", {"default": default_hparam("local_kernel"), "min": 0, "max": 15, "tooltip":
                                     "Local value branch kernel size (odd); 0: no local branch."}),
            "local_placement": (["inside", "outside"], {"default": default_hparam("local_placement"), "tooltip":
                                                        "SD3: the local branch inside the eta-weighted term (its "
                                                        "strength changes with resolution) or added outside it. "
                                                        "PixArt has no eta: both are the same."}),
            "cf_input": (["default", "residual", "modulated"], {"tooltip":
                                                                "What ConvFusion reads on SD3: the block's residual "
                                                                "stream or the modulated attention input. default: "
                                                                "residual on SD3, modulated on PixArt (its only choice)."}),
            "qkv_rank": ("INT", {"default": default_hparam("qkv_rank"), "min": 0, "max": MAX_QKV_RANK, "tooltip":
                                 "Rank of a learned low-rank update of each converted layer's normalised image q/k/v "
                                 "(read from the attention input); 0: none." + DESIGN_NOTE}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, layers):
        return check_layer_selection(layers)

    def init(self, model, layers, reduction, eta_mode, seed, cf_input="default", **options):
        spec = model_spec(model)
        return (init_bank(spec, select_layers(spec.layers, layers), seed=seed, reduction=reduction, eta_mode=eta_mode,
                          cf_input=None if cf_input == "default" else cf_input, **options),)


class SaveEDiT:
    DESCRIPTION = "Saves an EDiT bank to models/edit so EDiT Loader can load it."
    CATEGORY = "EDiT/loaders"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "edit_bank": (BANK,),
            "filename": ("STRING", {"default": "edit_bank", "tooltip":
                                    "File name in models/edit (.safetensors is added). An existing file is kept: "
                                    "a numbered name is used instead unless overwrite is on."}),
            "overwrite": ("BOOLEAN", {"default": False}),
        }}

    def save(self, edit_bank, filename, overwrite):
        stem = bank_file_stem(filename)
        folder = edit_folder()
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, stem + ".safetensors")
        n = 1
        while os.path.exists(path) and not overwrite:
            path = os.path.join(folder, f"{stem}_{n:05d}.safetensors")
            n += 1
        save_bank(edit_bank, path)
        return {"ui": {"text": [f"saved {path}"]}}
