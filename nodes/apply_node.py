"""Apply an EDiT bank to a model."""
from ..edit_core.comfyui.patcher import EditOptions, apply_edit
from .bank_nodes import BANK, check_layer_selection


class ApplyEDiT:
    DESCRIPTION = ("Replaces the model's attention with EDiT attention from a bank (a patched copy of the model; "
                   "the original stays untouched). SD3/SD3.5: hybrid attention, softmax wherever prompt tokens "
                   "take part. PixArt-Sigma: linear compressed self-attention.")
    CATEGORY = "EDiT/model"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "edit_bank": (BANK, {"tooltip": "From EDiT Loader, EDiT Distill or EDiT Init From Model."}),
            "enabled": ("BOOLEAN", {"default": True, "tooltip":
                                    "Off: the model computes exactly the original (handy for A/B runs)."}),
            "layers": ("STRING", {"default": "all", "tooltip":
                                  "Which of the bank's layers to use: 'all' (or blank), or block indices/ranges "
                                  "such as '0-12' or '4-23:attn'."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                        "EDiT runs from this point of sampling (0 = first step)..."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip":
                                      "...to this one; outside the range the original attention runs."}),
            "min_tokens": ("INT", {"default": 0, "min": 0, "max": 1 << 20, "tooltip":
                                   "Below this many image tokens the original attention runs. Tokens = "
                                   "(width/16) x (height/16): 4096 at 1024x1024."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, layers):
        return check_layer_selection(layers)

    def apply(self, model, edit_bank, enabled, layers, start_percent, end_percent, min_tokens):
        options = EditOptions(enabled, layers, start_percent, end_percent, min_tokens)
        return (apply_edit(model, edit_bank, options),)
