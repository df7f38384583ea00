"""The attention functions a benchmark run swaps in (``edit_core.comfyui.attention_function``):
ComfyUI's SDPA, and the zero-cost stand-in of the Amdahl bound."""
import comfy.ldm.modules.attention as comfy_attention

from edit_core.comfyui.attention_function import SDPA

# ComfyUI's decorator that lets transformer_options["optimized_attention_override"] take a call
# over (absent in older ComfyUI: then there is nothing to honour).
WRAP_ATTN = getattr(comfy_attention, "wrap_attn", lambda fn: fn)


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
