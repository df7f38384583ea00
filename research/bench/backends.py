"""Which attention function ComfyUI's models call during a benchmark run.

ComfyUI picks ``optimized_attention`` at import (on CPU: sub-quadratic attention), and
``mmdit.py`` and ``pixart/blocks.py`` bind the name at import time too, so all three module
globals are swapped together. The patchers look ``comfy.ldm.modules.attention.optimized_attention``
up at call time, so EDiT's softmax parts follow the same swap.
"""
from contextlib import contextmanager

import comfy.ldm.modules.attention as comfy_attention
import comfy.ldm.modules.diffusionmodules.mmdit as comfy_mmdit
import comfy.ldm.pixart.blocks as comfy_pixart_blocks

BOUND_MODULES = (comfy_attention, comfy_mmdit, comfy_pixart_blocks)
SDPA = comfy_attention.attention_pytorch
# ComfyUI's decorator that lets transformer_options["optimized_attention_override"] take a call
# over (absent in older ComfyUI: then there is nothing to honour).
WRAP_ATTN = getattr(comfy_attention, "wrap_attn", lambda fn: fn)


@contextmanager
def use_attention(fn):
    """Make ComfyUI's models (and EDiT's softmax parts) call ``fn`` as their attention."""
    saved = [m.optimized_attention for m in BOUND_MODULES]
    for m in BOUND_MODULES:
        m.optimized_attention = fn
    try:
        yield fn
    finally:
        for m, f in zip(BOUND_MODULES, saved):
            m.optimized_attention = f


class ZeroCostAttention:
    """The Amdahl-bound stand-in for ComfyUI's attention function.

    A self-attention call (as many keys as queries: SD3 joint attention, MMDiT-X attn2,
    PixArt self-attention) computes nothing: it returns a zero tensor of the output's shape
    and layout, allocated once per shape and reused, so the rest of the block (projections,
    norms, modulation, MLP, and its reading of the attention output) runs exactly as in the
    baseline while attention costs only a Python call. Any other call (PixArt's
    cross-attention to the prompt, which EDiT keeps) runs the real function. The bound is
    therefore slightly optimistic: real attention must at least write its output.
    """

    def __init__(self, real=SDPA):
        self.real = real
        self._zeros = {}
        # As ComfyUI's own attention functions are: an attention override in transformer_options
        # (ComfyUI's way for a patched block to swap only its attention) still applies.
        self._call = WRAP_ATTN(self._attention)
        self.new_run()

    def new_run(self):
        """Start counting the calls of one run afresh."""
        self.skipped = 0
        self.passed = 0

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def _attention(self, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
        token_dim = 2 if skip_reshape else 1
        if k.shape[token_dim] != q.shape[token_dim] or mask is not None:
            self.passed += 1
            return self.real(q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                             skip_output_reshape=skip_output_reshape, **kwargs)
        self.skipped += 1
        if skip_reshape:
            b, h, n, d = q.shape
            shape = (b, h, n, d) if skip_output_reshape else (b, n, h * d)
        else:
            shape = tuple(q.shape)
        key = (shape, q.dtype, q.device)
        if key not in self._zeros:
            self._zeros[key] = q.new_zeros(shape)
        return self._zeros[key]
