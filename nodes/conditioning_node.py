"""Seeded random conditioning: runs workflows on models without their text encoders."""
from ..edit_core.fixtures.tiny_models import random_conditioning


class EDiTRandomConditioning:
    DESCRIPTION = ("Random CONDITIONING seeded by the text and seed, in place of a text encoder: for smoke tests "
                   "and the built-in tiny models. Images made with it follow no prompt.")
    CATEGORY = "EDiT/testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": ("STRING", {"multiline": True, "default": "", "tooltip": "Only seeds the random tensor."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
            "tokens": ("INT", {"default": 154, "min": 1, "max": 4096}),
            "context_dim": ("INT", {"default": 4096, "min": 1, "max": 16384, "tooltip":
                                    "Width of the text features: 4096 for SD3/SD3.5 and PixArt (T5-XXL)."}),
            "pooled_dim": ("INT", {"default": 2048, "min": 0, "max": 16384, "tooltip":
                                   "Pooled vector width: 2048 for SD3/SD3.5; 0 for none (PixArt)."}),
        }}

    def encode(self, text, seed, tokens, context_dim, pooled_dim):
        return (random_conditioning(text, seed, tokens, context_dim, pooled_dim),)
