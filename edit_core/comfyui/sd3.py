"""SD3/SD3.5 (ComfyUI's MMDiT): the joint block's anatomy and its EDiT object patch.

``joint_blocks.{i}.forward`` calls the block's own forward (core block mixing,
``use_checkpoint`` and unknown keyword arguments passed on) with an
``optimized_attention_override`` that swaps only the attention: joint attention becomes
MM-EDiT hybrid attention, an MMDiT-X ``attn2`` linear compressed attention. Softmax parts go
through ComfyUI's attention function looked up at call time (backend overrides compose).
"""
from typing import Dict, Optional

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.ldm.modules.diffusionmodules.mmdit as comfy_mmdit
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

from ..bank import EDiTError, ModelSpec
from .call import CALL_KEY, EditCall, EditState, edit_layer_args
from .family import FamilyAdapter


def model_spec(dm: MMDiT) -> ModelSpec:
    layers = []
    for i, block in enumerate(dm.joint_blocks):
        layers.append(f"joint_blocks.{i}.attn")
        if block.x_block.x_block_self_attn:
            layers.append(f"joint_blocks.{i}.attn2")
    return ModelSpec("sd3", dm.hidden_size, dm.num_heads, len(dm.joint_blocks), tuple(layers))


def conditioning_dims(dm: MMDiT):
    pooled = dm.y_embedder.mlp[0].in_features if dm.y_embedder is not None else 0
    return dm.context_embedder.in_features, pooled


def token_grid(latent_hw):
    h, w = latent_hw
    return (h + 1) // 2, (w + 1) // 2  # PatchEmbed pads odd sizes


def _tokens(qkv):
    return tuple(t.reshape(t.shape[0], t.shape[1], -1) for t in qkv)


def comfy_softmax(heads: int, transformer_options: dict):
    """Softmax attention on (B, H, L, D) through ComfyUI's current attention function."""
    def softmax_attention(q, k, v):
        return comfy_attention.optimized_attention(q, k, v, heads, skip_reshape=True, skip_output_reshape=True,
                                                   transformer_options=transformer_options)
    return softmax_attention


def sd3_pre_attention(block, context, x, c):
    """A joint block's own pre-attention: (ctx_qkv, ctx_inter, x_qkv, x_qkv2, x_inter) with
    q, k, v as (B, L, C) (core returns v as (B, L, heads, D)); x_qkv2 is None without MMDiT-X."""
    cb, xb = block.context_block, block.x_block
    ctx_qkv, ctx_inter = cb.pre_attention(context, c)
    if xb.x_block_self_attn:
        x_qkv, x_qkv2, x_inter = xb.pre_attention_x(x, c)
    else:
        (x_qkv, x_inter), x_qkv2 = xb.pre_attention(x, c), None
    return _tokens(ctx_qkv), ctx_inter, _tokens(x_qkv), None if x_qkv2 is None else _tokens(x_qkv2), x_inter


def sd3_modulated_input(x_block, x, c, second: bool = False):
    """The input of a joint block's image qkv projection, computed as core's pre_attention(_x)
    does: modulate(norm1(x), shift, scale) with the block's adaLN modulation of c; ``second``:
    the MMDiT-X attn2's own shift and scale."""
    mod = x_block.adaLN_modulation(c)
    if x_block.scale_mod_only:
        shift, scale = None, mod.chunk(1 if x_block.pre_only else 4, dim=1)[0]
    else:
        chunks = mod.chunk(9 if x_block.x_block_self_attn else 2 if x_block.pre_only else 6, dim=1)
        shift, scale = chunks[6:8] if second else chunks[:2]
    return comfy_mmdit.modulate(x_block.norm1(x), shift, scale)


class SD3BlockPatch:
    """Object patch for ``joint_blocks.{i}.forward``: the block's own forward (core block
    mixing) with only the attention swapped, through ``optimized_attention_override``."""

    def __init__(self, original, block, index: int, attn=None, attn2=None, state: Optional[EditState] = None,
                 cf_input: str = "residual", qkv_update: bool = False):
        self.original = original
        self.block = block
        self.index = index
        self.attn = attn
        self.attn2 = attn2
        self.state = state or EditState()
        self.cf_input = cf_input  # what ConvFusion reads: "residual" (block input x) or "modulated"
        self.qkv_update = qkv_update  # whether the layers read the qkv projection's input

    def layer_args(self, x, c, second: bool):
        """(ConvFusion's input, the qkv update's input) for the block's attn (or attn2)."""
        needed = self.cf_input == "modulated" or self.qkv_update
        return edit_layer_args(self.cf_input, x, sd3_modulated_input(self.block.x_block, x, c, second)
                               if needed else None)

    def __call__(self, *args, **kwargs):
        to = kwargs.get("transformer_options")
        call = None if to is None else to.get(CALL_KEY)
        if call is None:
            self.state.unseen(f"joint_blocks.{self.index}")
            return self.original(*args, **kwargs)
        if call.owner is not self.state or not call.active:
            # Teacher / EDiT off, or a call of a later Apply EDiT that this (replaced) patch sits under.
            return self.original(*args, **kwargs)
        context, x = args[:2] if len(args) >= 2 else (kwargs["context"], kwargs["x"])
        c = kwargs["c"] if "c" in kwargs else args[2]
        if context.shape[1] == 0 and self.block.x_block.x_block_self_attn:
            raise EDiTError(f"SD3 block {self.index} got no prompt tokens: EDiT cannot tell its joint attention "
                            "from its attn2; run this model with a prompt")
        override = self.attention_override(call, context, x, c, to)
        return self.original(*args, **dict(kwargs, transformer_options=dict(to, optimized_attention_override=override)))

    def attention_override(self, call: EditCall, context, x, c, to: dict):
        """The block's attention calls, by length: [prompt; image] = joint attention, image only = attn2."""
        n_txt, n_img = context.shape[1], x.shape[1]
        previous = to.get("optimized_attention_override")
        block_inputs = dict(x=x, context=context, c=c)

        def core(func, args, kwargs):
            return func(*args, **kwargs) if previous is None else previous(func, *args, **kwargs)

        def override(func, *args, **kwargs):
            length = args[0].shape[1]
            if length == n_txt + n_img:
                if call.student and self.attn is not None:
                    out = self.joint_attention(*self.layer_args(x, c, False), n_txt, args[:3], call.grid, to)
                else:
                    out = core(func, args, kwargs)
                if call.sink is not None and self.attn is not None:
                    call.sink(f"joint_blocks.{self.index}.attn", call.grid, dict(block_inputs, out=out[:, n_txt:]))
            elif length == n_img:
                if call.student and self.attn2 is not None:
                    x_cf, h = self.layer_args(x, c, True)
                    out = self.attn2(x_cf, *_tokens(args[:3]), call.grid, h=h)
                else:
                    out = core(func, args, kwargs)
                if call.sink is not None and self.attn2 is not None:
                    call.sink(f"joint_blocks.{self.index}.attn2", call.grid, dict(block_inputs, out=out))
            else:
                out = core(func, args, kwargs)
            return out
        return override

    def joint_attention(self, x, h, n_txt: int, qkv, grid, to: dict):
        """MM-EDiT hybrid attention on core's concatenated [prompt; image] q, k, v: (B, L, C) out.
        x: ConvFusion's input; h: the image qkv projection's input (or None)."""
        q, k, v = _tokens(qkv)
        heads = self.block.x_block.attn.num_heads
        pre_only = self.block.context_block.pre_only
        o_txt, o_img = self.attn(x, q[:, :n_txt], k[:, :n_txt], v[:, :n_txt], q[:, n_txt:], k[:, n_txt:],
                                 v[:, n_txt:], grid, comfy_softmax(heads, to), prompt_rows=not pre_only, h=h)
        if o_txt is None:  # the last block has no prompt output: core drops these rows unread
            o_txt = o_img.new_zeros(o_img.shape[0], n_txt, o_img.shape[2])
        return torch.cat((o_txt, o_img), dim=1)


def layer_patches(dm: MMDiT, layer, bank_config, state: EditState, original) -> Dict[str, SD3BlockPatch]:
    """One patch per joint block with a converted attn or attn2."""
    patches = {}
    for i, block in enumerate(dm.joint_blocks):
        attn, attn2 = layer(f"joint_blocks.{i}.attn"), layer(f"joint_blocks.{i}.attn2")
        if attn is not None or attn2 is not None:
            key = f"diffusion_model.joint_blocks.{i}.forward"
            patches[key] = SD3BlockPatch(original(key), block, i, attn, attn2, state,
                                         cf_input=bank_config.cf_input, qkv_update=bank_config.qkv_rank > 0)
    return patches


def layer_inputs(dm: MMDiT, name: str, inputs: Dict[str, torch.Tensor], modulated: bool) -> Dict[str, torch.Tensor]:
    """From the block inputs x, context, c: x, h (None unless ``modulated``), q, k, v and, for
    joint attention, q_txt, k_txt, v_txt."""
    parts = name.split(".")
    block = dm.joint_blocks[int(parts[1])]
    ctx_qkv, _, x_qkv, x_qkv2, _ = sd3_pre_attention(block, inputs["context"], inputs["x"], inputs["c"])
    h = sd3_modulated_input(block.x_block, inputs["x"], inputs["c"], parts[2] == "attn2") if modulated else None
    if parts[2] == "attn2":
        return dict(x=inputs["x"], h=h, q=x_qkv2[0], k=x_qkv2[1], v=x_qkv2[2])
    return dict(x=inputs["x"], h=h, q=x_qkv[0], k=x_qkv[1], v=x_qkv[2], q_txt=ctx_qkv[0], k_txt=ctx_qkv[1],
                v_txt=ctx_qkv[2])


def block_keys(dm: MMDiT):
    return [f"diffusion_model.joint_blocks.{i}.forward" for i in range(len(dm.joint_blocks))]


ADAPTER = FamilyAdapter(name="sd3", model_class=MMDiT, patch_type=SD3BlockPatch, model_spec=model_spec,
                        conditioning_dims=conditioning_dims, token_grid=token_grid, layer_patches=layer_patches,
                        layer_inputs=layer_inputs, block_keys=block_keys)
