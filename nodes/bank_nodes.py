"""Load, create and save EDiT banks."""
import os

import folder_paths

from ..edit_core.bank import (EDiTError, bank_file_stem, init_bank, load_bank, parse_layer_selection, save_bank,
                               select_layers)
from ..edit_core.bank.options import LAYERS, SETTINGS, options_from_widgets
from ..edit_core.comfyui.model import model_spec
from ..edit_core.util.settings import widgets
from .folders import EDIT_FOLDER, edit_folder

BANK = "EDIT_BANK"
# The untrained bank's options the node shows: all of them, as the fidelity study compared them
# (docs/fidelity.md); the model-wide ones always, the student design as optional widgets whose
# defaults are the study's pick. In widget order (saved workflows depend on it).
REQUIRED_OPTIONS = ("reduction", "eta_mode")
DESIGN_OPTIONS = ("cf_kernel", "sc_kernel", "sc_stride", "local_kernel", "local_placement", "cf_input", "qkv_rank")


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
            **widgets([LAYERS], ["layers"]),
            **widgets(SETTINGS, REQUIRED_OPTIONS),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
        }, "optional": widgets(SETTINGS, DESIGN_OPTIONS)}

    @classmethod
    def VALIDATE_INPUTS(cls, layers):
        return check_layer_selection(layers)

    def init(self, model, layers, reduction, eta_mode, seed, **design):
        spec = model_spec(model)
        options = options_from_widgets(dict(design, reduction=reduction, eta_mode=eta_mode))
        return (init_bank(spec, select_layers(spec.layers, layers), seed=seed, **options),)


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
