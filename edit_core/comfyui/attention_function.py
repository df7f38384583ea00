"""Which attention function ComfyUI's models call (the benchmark's baselines, the plan's
measurements).

ComfyUI picks ``optimized_attention`` at import (on CPU: sub-quadratic attention), and
``mmdit.py`` and ``pixart/blocks.py`` bind the name at import time too, so a swap sets the
module globals together. The patchers look ``comfy.ldm.modules.attention.optimized_attention``
up at call time, so EDiT's softmax parts follow the same swap. Core PixArt takes no override
(its blocks get no transformer_options): its module global is the only way to choose.
"""
from contextlib import contextmanager

import comfy.ldm.modules.attention as comfy_attention
import comfy.ldm.modules.diffusionmodules.mmdit as comfy_mmdit
import comfy.ldm.pixart.blocks as comfy_pixart_blocks

ALL_MODULES = (comfy_attention, comfy_mmdit, comfy_pixart_blocks)
PIXART_MODULES = (comfy_pixart_blocks,)
# PyTorch's fused attention, what ComfyUI picks on CUDA.
SDPA = comfy_attention.attention_pytorch


@contextmanager
def use_attention(fn, modules=ALL_MODULES):
    """Make ComfyUI's models (and EDiT's softmax parts, with the default ``modules``) call
    ``fn`` as their attention, until the block ends."""
    saved = [m.optimized_attention for m in modules]
    for m in modules:
        m.optimized_attention = fn
    try:
        yield fn
    finally:
        for m, f in zip(modules, saved):
            m.optimized_attention = f
