"""What the benchmark runs: ComfyUI's own SD3.5-Medium and PixArt-Sigma classes at their real
widths with random weights (``models``), and for each point three variants of the same computation:

- ``baseline``: the model with EDiT off (teacher: exactly ComfyUI's code) and SDPA attention;
- ``edit``: the same model with EDiT on (student), patched by ``apply_edit`` with a random bank;
- ``bound``: the baseline with its image self-attentions replaced by ``ZeroCostAttention``
  (the Amdahl bound: everything but attention).

Levels:
- ``attention``: the attention call(s) alone, on q/k/v computed by block 0 of a 2-block model
  (bank layers called directly; no bound: it is zero there);
- ``block``: block 0 of a patched 2-block model at full width (SD3.5: an MMDiT-X joint block,
  not the last one), timed from its entry to its exit inside a real model call, which is then
  stopped there. Everything goes through ``apply_edit`` and ``call_model``, whatever the
  patcher does inside;
- ``model``: the whole patched model, its depth cut to ``depth`` blocks (width kept); with
  ``compile_backend`` the model is wrapped by ComfyUI's own ``set_torch_compile_wrapper``,
  the code path of its TorchCompileModel node.
"""
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management

from edit_core.attention.layers import split_heads
from edit_core.bank import init_bank
from edit_core.comfyui.attention_function import SDPA, use_attention
from edit_core.comfyui.model import FAMILIES as ADAPTERS, model_spec
from edit_core.comfyui.patcher import STUDENT, TEACHER, apply_edit, call_model
from edit_core.comfyui.pixart import pixart_qkv
from edit_core.comfyui.sd3 import comfy_softmax, sd3_pre_attention
from edit_core.comfyui.speed import model_inputs, sync
from edit_core.fixtures.tiny_models import randomize_
from .backends import ZeroCostAttention
from .grid import FAMILIES, FAMILY_TITLES, LEVELS
from .models import random_patcher

BLOCK_LEVEL_DEPTH = 2  # block 0 must not be SD3's last (pre-only) block
SPEC_FAMILY = {"sd35": "sd3", "pixart": "pixart"}


@dataclass
class Point:
    family: str
    level: str
    px: int
    batch: int
    prompt: int

    @property
    def grid(self) -> Tuple[int, int]:
        """The token grid of a square image of ``px`` pixels (latent px/8), as the patcher finds it."""
        return ADAPTERS[SPEC_FAMILY[self.family]].token_grid((self.px // 8, self.px // 8))

    @property
    def tokens(self) -> int:
        h, w = self.grid
        return h * w


Variants = Dict[str, Callable[[], object]]


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
        self.probe = None
        # One stand-in for every point: under torch.compile a new object per point would be a new graph.
        self.zero_cost = ZeroCostAttention(SDPA)
        base = random_patcher(family, depth if level == "model" else BLOCK_LEVEL_DEPTH, dtype, tiny, seed)
        self.spec = model_spec(base)
        blocks = _blocks(base.model.diffusion_model)
        # Random, not the zero-initialised untrained state: a trained bank has no zero branches.
        if level == "attention":  # block 0 and its bank layers, called directly
            self.block = blocks[0]
            names = [n for n in self.spec.layers if n.split(".")[1] == "0"]
            bank = randomize_(init_bank(self.spec, names, **(bank_hparams or {})), seed + 1).to(self.device)
            self.layers = [bank.layer(name) for name in names]
            return
        self.patcher = apply_edit(base, randomize_(init_bank(self.spec, **(bank_hparams or {})), seed + 1))
        if compile_backend:
            self.patcher = compiled_clone(self.patcher, compile_backend)
        # As a sampler loads it: with its additional models, the bank among them (else the bank's
        # weights would stay on the CPU and be copied to the GPU in every call).
        comfy.model_management.load_models_gpu([self.patcher] + self.patcher.get_nested_additional_models())
        if level == "block":
            self.probe = FirstBlockProbe(blocks[0], self.device)

    def describe(self) -> str:
        width = f"width {self.spec.hidden_size}, {self.spec.heads} heads"
        if self.level == "model":
            n = self.spec.depth
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
        c, heads = self.spec.hidden_size, self.spec.heads
        if self.family == "sd35":
            context, x, vec = self._randn(g, p.batch, p.prompt, c), self._randn(g, p.batch, p.tokens, c), \
                self._randn(g, p.batch, c)
            ctx_qkv, _, x_qkv, x_qkv2, _ = sd3_pre_attention(self.block, context, x, vec)
            attn, attn2 = self.layers

            def baseline():  # core's joint attention (concatenate [prompt; image], one call), then attn2
                comfy_attention.optimized_attention(*[torch.cat(t, dim=1) for t in zip(ctx_qkv, x_qkv)], heads=heads)
                return comfy_attention.optimized_attention(*x_qkv2, heads=heads)

            def edit():
                attn(x, *ctx_qkv, *x_qkv, p.grid, comfy_softmax(heads, {}))
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
        inputs = model_inputs(self.patcher, p.batch, p.px, p.px, p.prompt, seed=p.px + p.batch + p.prompt)
        conds = {k: v for k, v in inputs.items() if k not in ("x", "t")}

        def run(mode):
            def call():
                return call_model(self.patcher, inputs["x"], inputs["t"], conds, mode)
            return (lambda: self.probe.run(call)) if self.probe else call

        return {"baseline": run(TEACHER), "edit": run(STUDENT), "bound": run(TEACHER)}


def _blocks(diffusion_model):
    return diffusion_model.joint_blocks if hasattr(diffusion_model, "joint_blocks") else diffusion_model.blocks


def _under(attention, fn):
    def run():
        if isinstance(attention, ZeroCostAttention):
            attention.new_run()
        with torch.inference_mode(), use_attention(attention):
            return fn()
    return run
