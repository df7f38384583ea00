"""What the benchmark measures: its levels, families and default points, and the attention
it times as the baseline. No ComfyUI import: the command lines parse (and --help) before
their bootstrap."""
import torch

FAMILIES = ("sd35", "pixart")
LEVELS = ("attention", "block", "model")
FAMILY_TITLES = {"sd35": "SD3.5-Medium MMDiT-X joint block", "pixart": "PixArt-Sigma block"}
RESOLUTIONS = (512, 1024, 2048, 4096)
BATCHES = (1, 2)
PROMPTS = (154, 333)
# The name of edit_core.comfyui.attention_function.SDPA, ComfyUI's function that baseline and
# EDiT's softmax parts call.
SDPA_NAME = "comfy.ldm.modules.attention.attention_pytorch (torch.nn.functional.scaled_dot_product_attention)"


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
