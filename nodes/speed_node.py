"""Time a model with and without EDiT."""
import comfy.utils

from ..edit_core.util.plots import to_comfy_image
from ..edit_core.comfyui.speed import speed_test


class EDiTSpeedTest:
    DESCRIPTION = ("Times one call of the whole transformer with the original attention and with EDiT, at a chosen "
                   "resolution on the current device, and reports both (random inputs, same run). The model and its "
                   "EDiT bank are loaded on the device first; each gets an untimed warm-up call.")
    CATEGORY = "EDiT/benchmark"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("report_image", "report")
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The output of Apply EDiT."}),
            "width": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 16}),
            "height": ("INT", {"default": 1024, "min": 64, "max": 16384, "step": 16}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "2 = one CFG step."}),
            "prompt_tokens": ("INT", {"default": 154, "min": 1, "max": 4096, "tooltip":
                                      "SD3: 154 (CLIP 77 + T5 77); PixArt-Sigma: up to 300."}),
            "repeats": ("INT", {"default": 3, "min": 1, "max": 100, "tooltip": "Timed runs after one warm-up run."}),
        }}

    def run(self, model, width, height, batch_size, prompt_tokens, repeats):
        bar = comfy.utils.ProgressBar(2 * (repeats + 1))
        report = speed_test(model, width, height, batch_size, prompt_tokens, repeats, on_run=lambda: bar.update(1))
        return {"ui": {"text": [report.text()]}, "result": (to_comfy_image(report.image()), report.text())}
