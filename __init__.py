"""ComfyUI-EDiT: EDiT linear compressed attention for SD3/SD3.5 and PixArt-Sigma.

ComfyUI entry point: the node mappings (classic API, works on every ComfyUI version).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
