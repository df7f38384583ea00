"""What the benchmark runs: ComfyUI's own SD3.5-Medium and PixArt-Sigma classes at their real
widths with random weights, and for each point three variants of the same computation:

- ``baseline``: the unpatched block/model with ComfyUI's attention (SDPA);
- ``edit``: the same block/model patched by ``edit_core.patcher`` with a (random) bank layer;
- ``bound``: the unpatched block/model with its image self-attentions replaced by
  ``ZeroCostAttention`` (the Amdahl bound: everything but attention).

Levels: ``attention`` (the attention call(s) alone, on q/k/v the block computed), ``block``
(one block) and ``model`` (the whole patched model, depth cut to ``depth`` blocks, width kept).
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.supported_models
from comfy.ldm.modules.diffusionmodules.mmdit import JointBlock
from comfy.ldm.pixart.pixartms import PixArtMSBlock

from ..bank import ModelSpec, init_bank
from ..comfy_model import model_spec
from ..patcher import (STUDENT, TEACHER, PixArtAttentionPatch, SD3BlockPatch, apply_edit, comfy_softmax, edit_call,
                       pixart_qkv, sd3_pre_attention, split_heads)
from ..speed import model_inputs
from ..tiny_models import PIXART_CONTEXT_DIM, SD3_CONTEXT_DIM, SD3_POOLED_DIM, pixart_patcher, randomize_
from .backends import SDPA, ZeroCostAttention, use_attention

FAMILIES = ("sd35", "pixart")
LEVELS = ("attention", "block", "model")
# SD3.5-Medium: 24 blocks of width 1536 (24 heads x 64), RMS q/k norm, MMDiT-X attn2 in blocks 0-12.
SD35 = dict(hidden=1536, heads=24, depth=24, mmditx_layers=tuple(range(13)), pos_embed_max_size=384)
# PixArt-Sigma: 28 blocks of width 1152 (16 heads x 72), cross-attention to T5 tokens.
PIXART = dict(hidden=1152, heads=16, depth=28)
REAL = {"sd35": SD35, "pixart": PIXART}
# Smoke-test widths (tests, --tiny): the same classes and code paths, nothing worth timing.
TINY = {"sd35": dict(SD35, hidden=128, heads=2, depth=2, pos_embed_max_size=64),
        "pixart": dict(PIXART, hidden=64, heads=4, depth=2)}
FAMILY_TITLES = {"sd35": "SD3.5-Medium MMDiT-X joint block", "pixart": "PixArt-Sigma block"}


def token_grid(px: int) -> Tuple[int, int]:
    """Square image of ``px`` pixels: latent px/8, patch 2 -> (px/16, px/16) tokens (both families)."""
    side = max(1, px // 16)
    return side, side


@dataclass
class Point:
    family: str
    level: str
    px: int
    batch: int
    prompt: int

    @property
    def grid(self):
        return token_grid(self.px)

    @property
    def tokens(self) -> int:
        h, w = self.grid
        return h * w


Variants = Dict[str, Callable[[], object]]


def _bank_layers(family: str, cfg: dict, seed: int, device):
    if family == "sd35":
        spec = ModelSpec("sd3", cfg["hidden"], cfg["heads"], 1, ("joint_blocks.0.attn", "joint_blocks.0.attn2"))
    else:
        spec = ModelSpec("pixart", cfg["hidden"], cfg["heads"], 1, ("blocks.0.attn",))
    # Random, not the zero-initialised untrained state: a trained bank has no zero branches.
    bank = randomize_(init_bank(spec), seed).to(device)
    return [bank.layer(name) for name in spec.layers]


def sd35_block(cfg: dict, dtype, device, seed: int = 0) -> JointBlock:
    """One SD3.5-Medium MMDiT-X joint block (blocks 0-12 of the real model), ComfyUI's class."""
    block = JointBlock(cfg["hidden"], cfg["heads"], mlp_ratio=4.0, qkv_bias=True, attn_mode="torch", pre_only=False,
                       rmsnorm=False, scale_mod_only=False, swiglu=False, qk_norm="rms", x_block_self_attn=True,
                       dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    return randomize_(block, seed).to(device=device, dtype=dtype).eval()


def pixart_block(cfg: dict, dtype, device, seed: int = 0) -> PixArtMSBlock:
    """One PixArt-Sigma block, ComfyUI's class."""
    block = PixArtMSBlock(cfg["hidden"], cfg["heads"], mlp_ratio=4.0, qk_norm=False,
                          dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    return randomize_(block, seed).to(device=device, dtype=dtype).eval()


def sd35_patcher(cfg: dict, depth: int, dtype, seed: int = 0):
    """SD3.5-Medium at its width with the first ``depth`` of its blocks (the last one
    ``pre_only`` as in the real model), through ComfyUI's SD3 model class. ComfyUI's MMDiT
    has width 64 * its configured depth, so depth is configured from the width and the
    blocks are cut with ``num_blocks``."""
    unet_config = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": cfg["hidden"] // 64,
                   "num_blocks": depth,
                   "adm_in_channels": SD3_POOLED_DIM, "pos_embed_scaling_factor": None,
                   "context_embedder_config": {"target": "torch.nn.Linear",
                                               "params": {"in_features": SD3_CONTEXT_DIM, "out_features": cfg["hidden"]}},
                   "num_patches": cfg["pos_embed_max_size"] ** 2, "pos_embed_max_size": cfg["pos_embed_max_size"],
                   "qk_norm": "rms", "x_block_self_attn_layers": [i for i in cfg["mmditx_layers"] if i < depth]}
    model_config = comfy.supported_models.SD3(unet_config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "")
    randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


class Case:
    """The modules of one (family, level), built once and reused for every point."""

    def __init__(self, family: str, level: str, dtype, device, depth: int = 2, seed: int = 0, tiny: bool = False):
        if family not in FAMILIES or level not in LEVELS:
            raise ValueError(f"unknown family/level {family!r}/{level!r}: choose from {FAMILIES} / {LEVELS}")
        self.family, self.level, self.dtype, self.device = family, level, dtype, torch.device(device)
        self.cfg = (TINY if tiny else REAL)[family]
        if level == "model":
            base = (sd35_patcher(self.cfg, depth, dtype, seed) if family == "sd35" else
                    pixart_patcher(self.cfg["hidden"], self.cfg["heads"], depth, seed, dtype=dtype))
            self.patcher = apply_edit(base, randomize_(init_bank(model_spec(base)), seed + 1))
            comfy.model_management.load_models_gpu([self.patcher])
        else:
            self.block = (sd35_block if family == "sd35" else pixart_block)(self.cfg, dtype, self.device, seed)
            self.layers = _bank_layers(family, self.cfg, seed + 1, self.device)

    def describe(self) -> str:
        width = f"width {self.cfg['hidden']}, {self.cfg['heads']} heads"
        if self.level == "model":
            dm = self.patcher.model.diffusion_model
            n = len(dm.joint_blocks if self.family == "sd35" else dm.blocks)
            return f"{self.family} model, {n} blocks, {width}"
        return f"{FAMILY_TITLES[self.family]}, {width}"

    def variants(self, point: Point) -> Tuple[Variants, Dict[str, ZeroCostAttention]]:
        """Callables for baseline / edit / bound at a point (bound absent at the attention
        level, where it is zero), and the ZeroCostAttention each bound variant uses."""
        g = torch.Generator().manual_seed(point.px * 1009 + point.batch * 31 + point.prompt)
        make = getattr(self, f"_{self.level}_{self.family}" if self.level != "model" else "_model")
        variants = make(point, g)
        zeros = {}
        if "bound" in variants:
            zeros["bound"] = ZeroCostAttention(SDPA)
            variants["bound"] = _under(zeros["bound"], variants["bound"])
        for name in ("baseline", "edit"):
            variants[name] = _under(SDPA, variants[name])
        return variants, zeros

    def _randn(self, g, *shape):
        return torch.randn(*shape, generator=g).to(device=self.device, dtype=self.dtype)

    # -- SD3.5-Medium --------------------------------------------------------------------
    def _sd35_inputs(self, p: Point, g):
        c = self.cfg["hidden"]
        return self._randn(g, p.batch, p.prompt, c), self._randn(g, p.batch, p.tokens, c), self._randn(g, p.batch, c)

    def _block_sd35(self, p: Point, g) -> Variants:
        context, x, c = self._sd35_inputs(p, g)
        block = self.block
        patch = SD3BlockPatch(block.forward, block, 0, *self.layers)

        def baseline():
            return block(context, x, c=c, use_checkpoint=False, transformer_options={})

        def edit():
            with edit_call(True, p.grid):
                return patch(context, x, c=c, transformer_options={})

        return {"baseline": baseline, "edit": edit, "bound": baseline}

    def _attention_sd35(self, p: Point, g) -> Variants:
        context, x, c = self._sd35_inputs(p, g)
        heads = self.cfg["heads"]
        ctx_qkv, _, x_qkv, x_qkv2, _ = sd3_pre_attention(self.block, context, x, c)
        attn, attn2 = self.layers

        def baseline():  # core's joint attention (concatenate [prompt; image], one call), then attn2
            comfy_attention.optimized_attention(*[torch.cat(t, dim=1) for t in zip(ctx_qkv, x_qkv)], heads=heads)
            return comfy_attention.optimized_attention(*x_qkv2, heads=heads)

        def edit():
            attn(x, *ctx_qkv, *x_qkv, p.grid, comfy_softmax(heads, {}))
            return attn2(x, *x_qkv2, p.grid)

        return {"baseline": baseline, "edit": edit}

    # -- PixArt-Sigma ----------------------------------------------------------------------
    def _pixart_inputs(self, p: Point, g):
        c = self.cfg["hidden"]
        # The model folds the prompts of a batch into one (1, B*M, C) sequence.
        return self._randn(g, p.batch, p.tokens, c), self._randn(g, 1, p.batch * p.prompt, c), self._randn(g, p.batch, 6 * c)

    def _block_pixart(self, p: Point, g) -> Variants:
        x, y, t = self._pixart_inputs(p, g)
        block = self.block
        hw = (p.grid[0] * 2, p.grid[1] * 2)
        patch = PixArtAttentionPatch(block.attn.forward, block.attn, 0, self.layers[0])

        def baseline():
            return block(x, y, t, None, hw)

        def edit():
            block.attn.forward = patch  # what ComfyUI's object patch does, undone after the call
            try:
                with edit_call(True, p.grid):
                    return block(x, y, t, None, hw)
            finally:
                del block.attn.forward

        return {"baseline": baseline, "edit": edit, "bound": baseline}

    def _attention_pixart(self, p: Point, g) -> Variants:
        x = self._randn(g, p.batch, p.tokens, self.cfg["hidden"])
        attn, layer = self.block.attn, self.layers[0]
        heads = self.cfg["heads"]
        q, k, v = pixart_qkv(attn, x)

        def baseline():  # as AttentionKVCompress calls it: (B, H, N, D) views in, (B, N, C) out
            return comfy_attention.optimized_attention(split_heads(q, heads), split_heads(k, heads),
                                                       split_heads(v, heads), heads, skip_reshape=True)

        def edit():
            return layer(x, q, k, v, p.grid)

        return {"baseline": baseline, "edit": edit}

    # -- whole model -------------------------------------------------------------------------
    def _model(self, p: Point, g) -> Variants:
        px = p.grid[0] * 16
        inputs = model_inputs(self.patcher, p.batch, px, px, p.prompt, seed=p.px + p.batch + p.prompt)
        model = self.patcher.model

        def run(mode):
            return lambda: model.apply_model(inputs["x"], inputs["t"], c_crossattn=inputs["c_crossattn"],
                                             y=inputs.get("y"), transformer_options={"edit_mode": mode})

        return {"baseline": run(TEACHER), "edit": run(STUDENT), "bound": run(TEACHER)}


def _under(attention, fn):
    def run():
        if isinstance(attention, ZeroCostAttention):
            attention.new_run()
        with torch.inference_mode(), use_attention(attention):
            return fn()
    return run
