"""ComfyUI-EDiT nodes: thin classes that validate inputs and call edit_core."""
from .apply_node import ApplyEDiT
from .bank_nodes import EDiTInitFromModel, EDiTLoader, SaveEDiT
from .conditioning_node import EDiTRandomConditioning
from .distill_node import EDiTDistill
from .folders import register_edit_folder
from .speed_node import EDiTSpeedTest

register_edit_folder()

NODE_CLASS_MAPPINGS = {
    "EDiTLoader": EDiTLoader,
    "EDiTInitFromModel": EDiTInitFromModel,
    "ApplyEDiT": ApplyEDiT,
    "SaveEDiT": SaveEDiT,
    "EDiTSpeedTest": EDiTSpeedTest,
    "EDiTDistill": EDiTDistill,
    "EDiTRandomConditioning": EDiTRandomConditioning,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "EDiTLoader": "EDiT Loader",
    "EDiTInitFromModel": "EDiT Init From Model",
    "ApplyEDiT": "Apply EDiT",
    "SaveEDiT": "Save EDiT",
    "EDiTSpeedTest": "EDiT Speed Test",
    "EDiTDistill": "EDiT Distill",
    "EDiTRandomConditioning": "EDiT Random Conditioning (testing)",
}
