"""PixArt-Sigma/Alpha (ComfyUI's PixArtMS): its self-attention's anatomy and EDiT object patch.

``blocks.{i}.attn.forward`` runs linear compressed attention between the module's own ``qkv``
and ``proj``. Core PixArt drops transformer_options before its blocks, so the patch reads the
running call from its application's ``EditState``.
"""
from typing import Dict, Optional

import torch

from comfy.ldm.pixart.pixartms import PixArtMS

from ..bank import EDiTError, ModelSpec
from .call import EditCall, EditState
from .family import FamilyAdapter


def model_spec(dm: PixArtMS) -> ModelSpec:
    compressed = [i for i, b in enumerate(dm.blocks) if b.attn.sr_ratio > 1]
    if compressed:
        raise EDiTError(f"this PixArt model uses its own KV compression in blocks {compressed}; "
                        "EDiT supports PixArt models with full self-attention")
    return ModelSpec("pixart", dm.hidden_size, dm.num_heads, len(dm.blocks),
                     tuple(f"blocks.{i}.attn" for i in range(len(dm.blocks))))


def conditioning_dims(dm: PixArtMS):
    return dm.y_embedder.y_proj.fc1.in_features, 0


def token_grid(latent_hw):
    h, w = latent_hw
    return h // 2, w // 2  # the patch embedding drops the remainder


def pixart_qkv(attn, x):
    """PixArt self-attention's own q, k, v (after its q/k norm) as (B, N, C)."""
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, c).unbind(2)
    return attn.q_norm(q), attn.k_norm(k), v


class PixArtAttentionPatch:
    """Object patch for ``blocks.{i}.attn.forward``: linear compressed self-attention."""

    def __init__(self, original, attn_module, index: int, layer, state: Optional[EditState] = None):
        self.original = original
        self.module = attn_module
        self.index = index
        self.layer = layer
        self.state = state or EditState()

    def __call__(self, x, *args, **kwargs):
        call = self.state.call
        if call is None:
            self.state.unseen(f"blocks.{self.index}.attn")
            return self.original(x, *args, **kwargs)
        if not call.active:
            return self.original(x, *args, **kwargs)
        name = f"blocks.{self.index}.attn"
        if not call.student:
            return self.capture_original(name, call, x, *args, **kwargs)
        n = x.shape[1]
        if call.grid[0] * call.grid[1] != n:
            raise EDiTError(f"PixArt block {self.index}: {n} tokens do not fill the {call.grid} token grid")
        q, k, v = pixart_qkv(self.module, x)
        out = self.layer(x, q, k, v, call.grid)
        if call.sink is not None:
            call.sink(name, call.grid, dict(x=x, out=out))
        return self.module.proj(out)

    def capture_original(self, name, call: EditCall, x, *args, **kwargs):
        """The original forward, exactly as core runs it, with its attention output (the input
        of ``proj``) handed to the sink."""
        seen = []
        hook = self.module.proj.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
        try:
            result = self.original(x, *args, **kwargs)
        finally:
            hook.remove()
        call.sink(name, call.grid, dict(x=x, out=seen[0]))
        return result


def layer_patches(dm: PixArtMS, layer, bank_config, state: EditState, original) -> Dict[str, PixArtAttentionPatch]:
    """One patch per converted self-attention."""
    patches = {}
    for i, block in enumerate(dm.blocks):
        bank_layer = layer(f"blocks.{i}.attn")
        if bank_layer is not None:
            key = f"diffusion_model.blocks.{i}.attn.forward"
            patches[key] = PixArtAttentionPatch(original(key), block.attn, i, bank_layer, state)
    return patches


def layer_inputs(dm: PixArtMS, name: str, inputs: Dict[str, torch.Tensor], modulated: bool) -> Dict[str, torch.Tensor]:
    """From the attention input x: x, h (x itself), q, k, v."""
    block = dm.blocks[int(name.split(".")[1])]
    q, k, v = pixart_qkv(block.attn, inputs["x"])
    return dict(x=inputs["x"], h=inputs["x"], q=q, k=k, v=v)


def block_keys(dm: PixArtMS):
    return [f"diffusion_model.blocks.{i}.forward" for i in range(len(dm.blocks))]


ADAPTER = FamilyAdapter(name="pixart", model_class=PixArtMS, patch_type=PixArtAttentionPatch, model_spec=model_spec,
                        conditioning_dims=conditioning_dims, token_grid=token_grid, layer_patches=layer_patches,
                        layer_inputs=layer_inputs, block_keys=block_keys)
