"""What the benchmark runs: ComfyUI's own SD3.5-Medium and PixArt-Sigma classes at their real
widths with random weights, and for each point three variants of the same computation:

- ``baseline``: the model with EDiT off (teacher: exactly ComfyUI's code) and SDPA attention;
- ``edit``: the same model with EDiT on (student), patched by ``apply_edit`` with a random bank;
- ``bound``: the baseline with its image self-attentions replaced by ``ZeroCostAttention``
  (the Amdahl bound: everything but attention).

Levels:
- ``attention``: the attention call(s) alone, on q/k/v a block computed (bank layers called
  directly; no bound: it is zero there);
- ``block``: block 0 of a patched 2-block model at full width (SD3.5: an MMDiT-X joint block,
  not the last one), timed from its entry to its exit inside a real model call, which is then
  stopped there. Everything goes through ``apply_edit`` and ``call_model``, whatever the
  patcher does inside;
- ``model``: the whole patched model, its depth cut to ``depth`` blocks (width kept); with
  ``compile_backend`` the model is wrapped by ComfyUI's own ``set_torch_compile_wrapper``,
  the code path of its TorchCompileModel node.
"""
import math
import time
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

from edit_core.bank import ModelSpec, init_bank
from edit_core.comfyui.model import model_spec
from edit_core.attention.layers import split_heads
from edit_core.comfyui.patcher import STUDENT, TEACHER, apply_edit, call_model, pixart_qkv, sd3_pre_attention
from edit_core.comfyui.speed import model_inputs, sync
from edit_core.fixtures.tiny_models import SD3_CONTEXT_DIM, SD3_POOLED_DIM, pixart_unet_config, randomize_
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
BLOCK_LEVEL_DEPTH = 2  # block 0 must not be SD3's last (pre-only) block


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


@torch.no_grad()
def random_weights_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``randomize_``'s distribution (matrices ~ N(0, 1/fan_in), norm scales ~ 1, other vectors
    ~ N(0, 0.02)), drawn where the weights are: seconds, not minutes, for a 2.5B model on a GPU."""
    for i, (name, p) in enumerate(list(module.named_parameters()) + list(module.named_buffers())):
        if not p.is_floating_point():
            continue
        g = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
        v = torch.empty(p.shape, device=p.device, dtype=torch.float32)
        if p.ndim >= 2:
            v.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
        elif any(s in name for s in ("ln_q", "ln_k", "norm")):
            v.normal_(1.0, 0.1, generator=g)
        else:
            v.normal_(0.0, 0.02, generator=g)
        p.copy_(v)
    return module


def _patcher(model):
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def sd35_patcher(cfg: dict, depth: int, dtype, seed: int = 0):
    """SD3.5-Medium at its width with the first ``depth`` of its blocks (the last one
    ``pre_only`` as in the real model), through ComfyUI's SD3 model class, random weights
    drawn on the load device. ComfyUI's MMDiT has width 64 * its configured depth, so depth
    is configured from the width and the blocks are cut with ``num_blocks``."""
    unet_config = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": cfg["hidden"] // 64,
                   "num_blocks": depth,
                   "adm_in_channels": SD3_POOLED_DIM, "pos_embed_scaling_factor": None,
                   "context_embedder_config": {"target": "torch.nn.Linear",
                                               "params": {"in_features": SD3_CONTEXT_DIM, "out_features": cfg["hidden"]}},
                   "num_patches": cfg["pos_embed_max_size"] ** 2, "pos_embed_max_size": cfg["pos_embed_max_size"],
                   "qk_norm": "rms", "x_block_self_attn_layers": [i for i in cfg["mmditx_layers"] if i < depth]}
    return _random_model(comfy.supported_models.SD3(unet_config), dtype, seed)


def pixart_patcher(cfg: dict, depth: int, dtype, seed: int = 0):
    """PixArt-Sigma at its width with ``depth`` blocks, ComfyUI's class, random weights."""
    return _random_model(comfy.supported_models.PixArtSigma(pixart_unet_config(cfg["hidden"], cfg["heads"], depth)),
                         dtype, seed)


def _random_model(model_config, dtype, seed):
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "")  # ComfyUI's layers skip initialisation: filled below
    model.diffusion_model.to(comfy.model_management.get_torch_device())
    random_weights_(model.diffusion_model, seed)
    return _patcher(model)


class BlockDone(Exception):
    """Raised at block 0's exit to end a block-level model call there."""


class FirstBlockProbe:
    """Times block 0 of a model call (device synchronised at its entry and exit) and stops
    the call there, so the block level measures one block inside a real patched call."""

    def __init__(self, block: torch.nn.Module, device):
        self.device = device
        self.seconds: Optional[float] = None
        self._t0 = 0.0
        self.handles = [block.register_forward_pre_hook(self._enter), block.register_forward_hook(self._exit)]

    def _enter(self, module, args):
        sync(self.device)
        self._t0 = time.perf_counter()

    def _exit(self, module, args, out):
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        raise BlockDone

    def run(self, call: Callable[[], object]) -> float:
        """Seconds block 0 took during ``call``."""
        self.seconds = None
        try:
            call()
        except BlockDone:
            return self.seconds
        raise RuntimeError("block 0 never ran during the model call")

    def remove(self):
        for h in self.handles:
            h.remove()


class GraphBreakCounter:
    """What Dynamo reports while a compiled variant runs: graph breaks and graphs compiled in
    its first call, and graphs compiled in later calls (recompiles: each one means a warm call
    did not reuse the compiled code)."""

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn
        self.graph_breaks: Optional[int] = None
        self.graphs: Optional[int] = None
        self.recompiles = 0

    def __call__(self):
        counters = torch._dynamo.utils.counters
        breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
        out = self.fn()
        if self.graph_breaks is None:
            self.graph_breaks = sum(counters["graph_break"].values()) - breaks
            self.graphs = counters["stats"]["unique_graphs"] - graphs
        else:
            self.recompiles += counters["stats"]["unique_graphs"] - graphs
        return out


def compiled_clone(patcher, backend: str):
    """A clone of ``patcher`` as ComfyUI's TorchCompileModel node makes it (its own helper,
    same defaults). Dynamo's recompile limit is raised: baseline, EDiT and bound are different
    graphs of one compiled module, and past the limit Dynamo silently runs eager."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    m = patcher.clone()
    set_torch_compile_wrapper(model=m, backend=backend)
    return m


def _bank_layers(family: str, cfg: dict, seed: int, device, hparams: dict):
    if family == "sd35":
        spec = ModelSpec("sd3", cfg["hidden"], cfg["heads"], 1, ("joint_blocks.0.attn", "joint_blocks.0.attn2"))
    else:
        spec = ModelSpec("pixart", cfg["hidden"], cfg["heads"], 1, ("blocks.0.attn",))
    # Random, not the zero-initialised untrained state: a trained bank has no zero branches.
    bank = randomize_(init_bank(spec, **hparams), seed).to(device)
    return [bank.layer(name) for name in spec.layers]


def sd35_block(cfg: dict, dtype, device, seed: int = 0) -> JointBlock:
    """One SD3.5-Medium MMDiT-X joint block (blocks 0-12 of the real model), ComfyUI's class."""
    block = JointBlock(cfg["hidden"], cfg["heads"], mlp_ratio=4.0, qkv_bias=True, attn_mode="torch", pre_only=False,
                       rmsnorm=False, scale_mod_only=False, swiglu=False, qk_norm="rms", x_block_self_attn=True,
                       dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
    return random_weights_(block, seed).eval()


def pixart_block(cfg: dict, dtype, device, seed: int = 0) -> PixArtMSBlock:
    """One PixArt-Sigma block, ComfyUI's class."""
    block = PixArtMSBlock(cfg["hidden"], cfg["heads"], mlp_ratio=4.0, qk_norm=False,
                          dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
    return random_weights_(block, seed).eval()


def comfy_softmax(heads: int):
    """Softmax attention on (B, H, L, D) through ComfyUI's current attention function."""
    def softmax_attention(q, k, v):
        return comfy_attention.optimized_attention(q, k, v, heads, skip_reshape=True, skip_output_reshape=True)
    return softmax_attention


class Case:
    """The modules of one (family, level), built once and reused for every point."""

    def __init__(self, family: str, level: str, dtype, device, depth: int = 2, seed: int = 0, tiny: bool = False,
                 compile_backend: Optional[str] = None, bank_hparams: Optional[dict] = None):
        """``bank_hparams``: the EDiT bank's hyper-parameters (``init_bank`` keywords), e.g. a
        student design of the fidelity study; default: the bank's defaults."""
        if family not in FAMILIES or level not in LEVELS:
            raise ValueError(f"unknown family/level {family!r}/{level!r}: choose from {FAMILIES} / {LEVELS}")
        if compile_backend and level != "model":
            raise ValueError(f"compiled runs are measured at the model level, not the {level!r} level")
        self.family, self.level, self.dtype, self.device = family, level, dtype, torch.device(device)
        self.compile_backend = compile_backend
        self.cfg = (TINY if tiny else REAL)[family]
        self.probe = None
        # One stand-in for every point: under torch.compile a new object per point would be a new graph.
        self.zero_cost = ZeroCostAttention(SDPA)
        if level == "attention":
            self.block = (sd35_block if family == "sd35" else pixart_block)(self.cfg, dtype, self.device, seed)
            self.layers = _bank_layers(family, self.cfg, seed + 1, self.device, bank_hparams or {})
            return
        depth = BLOCK_LEVEL_DEPTH if level == "block" else depth
        base = (sd35_patcher if family == "sd35" else pixart_patcher)(self.cfg, depth, dtype, seed)
        self.patcher = apply_edit(base, randomize_(init_bank(model_spec(base), **(bank_hparams or {})), seed + 1))
        if compile_backend:
            self.patcher = compiled_clone(self.patcher, compile_backend)
        # As a sampler loads it: with its additional models, the bank among them (else the bank's
        # weights would stay on the CPU and be copied to the GPU in every call).
        comfy.model_management.load_models_gpu([self.patcher] + self.patcher.get_nested_additional_models())
        if level == "block":
            dm = self.patcher.model.diffusion_model
            self.probe = FirstBlockProbe(dm.joint_blocks[0] if family == "sd35" else dm.blocks[0], self.device)

    def describe(self) -> str:
        width = f"width {self.cfg['hidden']}, {self.cfg['heads']} heads"
        if self.level == "model":
            dm = self.patcher.model.diffusion_model
            n = len(dm.joint_blocks if self.family == "sd35" else dm.blocks)
            mode = f", compiled ({self.compile_backend})" if self.compile_backend else ""
            return f"{self.family} model, {n} blocks, {width}{mode}"
        return f"{FAMILY_TITLES[self.family]}, {width}"

    def close(self):
        """Remove the block probe's hooks (the model is shared with nothing else)."""
        if self.probe is not None:
            self.probe.remove()

    def variants(self, point: Point) -> Tuple[Variants, Dict[str, object]]:
        """Callables for baseline / edit / bound at a point (bound absent at the attention
        level, where it is zero), and the ZeroCostAttention (``bound``) and GraphBreakCounters
        (per variant, compiled only) they use."""
        g = torch.Generator().manual_seed(point.px * 1009 + point.batch * 31 + point.prompt)
        variants = self._attention(point, g) if self.level == "attention" else self._model_call(point)
        extras = {}
        if "bound" in variants:
            extras["bound"] = self.zero_cost
            variants["bound"] = _under(extras["bound"], variants["bound"])
        for name in ("baseline", "edit"):
            variants[name] = _under(SDPA, variants[name])
        if self.compile_backend:
            for name in list(variants):
                variants[name] = extras[f"graphs {name}"] = GraphBreakCounter(variants[name])
        return variants, extras

    def _randn(self, g, *shape):
        return torch.randn(*shape, generator=g).to(device=self.device, dtype=self.dtype)

    # -- attention level -----------------------------------------------------------------
    def _attention(self, p: Point, g) -> Variants:
        c, heads = self.cfg["hidden"], self.cfg["heads"]
        if self.family == "sd35":
            context, x, vec = self._randn(g, p.batch, p.prompt, c), self._randn(g, p.batch, p.tokens, c), \
                self._randn(g, p.batch, c)
            ctx_qkv, _, x_qkv, x_qkv2, _ = sd3_pre_attention(self.block, context, x, vec)
            attn, attn2 = self.layers

            def baseline():  # core's joint attention (concatenate [prompt; image], one call), then attn2
                comfy_attention.optimized_attention(*[torch.cat(t, dim=1) for t in zip(ctx_qkv, x_qkv)], heads=heads)
                return comfy_attention.optimized_attention(*x_qkv2, heads=heads)

            def edit():
                attn(x, *ctx_qkv, *x_qkv, p.grid, comfy_softmax(heads))
                return attn2(x, *x_qkv2, p.grid)

            return {"baseline": baseline, "edit": edit}

        x = self._randn(g, p.batch, p.tokens, c)
        layer = self.layers[0]
        q, k, v = pixart_qkv(self.block.attn, x)

        def baseline():  # as AttentionKVCompress calls it: (B, H, N, D) views in, (B, N, C) out
            return comfy_attention.optimized_attention(split_heads(q, heads), split_heads(k, heads),
                                                       split_heads(v, heads), heads, skip_reshape=True)

        def edit():
            return layer(x, q, k, v, p.grid)

        return {"baseline": baseline, "edit": edit}

    # -- block and model levels: one call of the patched model ---------------------------------
    def _model_call(self, p: Point) -> Variants:
        px = p.grid[0] * 16
        inputs = model_inputs(self.patcher, p.batch, px, px, p.prompt, seed=p.px + p.batch + p.prompt)
        conds = {k: v for k, v in inputs.items() if k not in ("x", "t")}

        def run(mode):
            def call():
                return call_model(self.patcher, inputs["x"], inputs["t"], conds, mode)
            return (lambda: self.probe.run(call)) if self.probe else call

        return {"baseline": run(TEACHER), "edit": run(STUDENT), "bound": run(TEACHER)}


def _under(attention, fn):
    def run():
        if isinstance(attention, ZeroCostAttention):
            attention.new_run()
        with torch.inference_mode(), use_attention(attention):
            return fn()
    return run
