"""Apply an EDiT bank to a ComfyUI model: a patched *clone*, never the shared base.

Mechanism (see docs/design.md):
- ``diffusion_model.forward`` gets a ``ModelForwardPatch`` object patch. Per call it decides
  whether the EDiT (student) path runs (options, sampling range, image size, or an explicit
  ``transformer_options["edit_mode"]``), computes the token grid from the latent's shape, and
  publishes both in a ContextVar for the duration of that call only.
- Each converted layer gets an object patch: SD3 ``joint_blocks.{i}.forward`` (joint attention
  becomes MM-EDiT hybrid attention, an MMDiT-X ``attn2`` becomes linear compressed
  attention), PixArt ``blocks.{i}.attn.forward`` (linear compressed attention). They call the
  model's own ``pre_attention``/``post_attention``/``qkv``/``proj`` modules every time (LoRA,
  lowvram and fp8 keep working) and run softmax parts through ComfyUI's attention function
  looked up at call time (sage/flash/xformers overrides compose). Outside an EDiT call they
  call the original forward untouched.
- ComfyUI applies object patches when it loads the clone and restores the originals when it
  unloads it; the bank rides along as an additional model, loaded and offloaded with it.
"""
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher

from .bank import EDiTBank, EDiTError, check_bank_fits, select_layers
from .comfy_model import model_spec
from .modules import merge_heads, split_heads

TEACHER, STUDENT = "teacher", "student"
BANK_KEY = "edit_bank"

# sink(layer_name, grid, tensors): receives every converted layer's inputs and attention
# output during a call that asked for it (distillation). Tensors: the layer's inputs (SD3:
# the block inputs x, context, c; PixArt: the attention input x; ``layer_inputs`` turns
# them into q, k, v) and out, the image rows of the attention output (teacher's or
# student's, as the call ran).
CaptureSink = Callable[[str, Tuple[int, int], Dict[str, torch.Tensor]], None]


@dataclass(frozen=True)
class EditOptions:
    """How a patched model uses its bank.

    enabled: master switch (False: the patched model computes exactly the original).
    layers: 'all' or block indices/ranges, e.g. '0-12' or '0-12:attn2' (see select_layers).
    start_percent, end_percent: the part of sampling where EDiT runs (ComfyUI's percent
        convention: 0 = first step); outside it the original attention runs.
    min_tokens: below this many image tokens the original attention runs (small images gain nothing).
    """
    enabled: bool = True
    layers: str = "all"
    start_percent: float = 0.0
    end_percent: float = 1.0
    min_tokens: int = 0

    def __post_init__(self):
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise EDiTError(f"sampling range must satisfy 0 <= start_percent <= end_percent <= 1, got "
                            f"{self.start_percent}..{self.end_percent}")
        if self.min_tokens < 0:
            raise EDiTError(f"min_tokens must be >= 0, got {self.min_tokens}")


@dataclass(frozen=True)
class EditCall:
    student: bool
    grid: Tuple[int, int]
    sink: Optional[CaptureSink]
    transformer_options: dict


_CALL: ContextVar[Optional[EditCall]] = ContextVar("comfyui_edit_call", default=None)


@contextmanager
def edit_call(student: bool, grid: Tuple[int, int], sink: Optional[CaptureSink] = None,
              transformer_options: Optional[dict] = None):
    """Run the EDiT (student) or original (teacher) path in the patched layers called inside,
    for this call only (a ContextVar: nothing is stored on shared modules)."""
    token = _CALL.set(EditCall(student, grid, sink, transformer_options or {}))
    try:
        yield
    finally:
        _CALL.reset(token)


def token_grid(family: str, latent_hw) -> Tuple[int, int]:
    h, w = latent_hw
    # SD3's PatchEmbed pads odd sizes; PixArt's drops the remainder.
    return ((h + 1) // 2, (w + 1) // 2) if family == "sd3" else (h // 2, w // 2)


def comfy_softmax(heads: int, transformer_options: dict):
    """Softmax attention on (B, H, L, D) through ComfyUI's current attention function."""
    def softmax_attention(q, k, v):
        return comfy_attention.optimized_attention(q, k, v, heads, skip_reshape=True, skip_output_reshape=True,
                                                   transformer_options=transformer_options)
    return softmax_attention


class ModelForwardPatch:
    """Object patch for ``diffusion_model.forward``: per-call EDiT decision and token grid."""

    def __init__(self, original, family: str, options: EditOptions, base_model):
        self.original = original
        self.family = family
        self.options = options
        self.base_model = base_model  # read at call time: its model_sampling may be patched later

    def in_sampling_range(self, transformer_options) -> bool:
        sigmas = transformer_options.get("sigmas")
        if sigmas is None or (self.options.start_percent, self.options.end_percent) == (0.0, 1.0):
            return True
        ms = self.base_model.model_sampling
        sigma = float(sigmas.reshape(-1)[0])
        return ms.percent_to_sigma(self.options.end_percent) <= sigma <= ms.percent_to_sigma(self.options.start_percent)

    def __call__(self, x, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        grid = token_grid(self.family, x.shape[-2:])
        mode = to.get("edit_mode")
        if mode not in (None, TEACHER, STUDENT):
            raise EDiTError(f"transformer_options['edit_mode'] must be {TEACHER!r} or {STUDENT!r}, got {mode!r}")
        if mode is None:
            student = (self.options.enabled and grid[0] * grid[1] >= self.options.min_tokens
                       and self.in_sampling_range(to))
        else:
            student = mode == STUDENT
        with edit_call(student, grid, to.get("edit_capture"), to):
            return self.original(x, *args, **kwargs)


def _active_call() -> Optional[EditCall]:
    call = _CALL.get()
    if call is None or (not call.student and call.sink is None):
        return None
    return call


def _tokens(qkv):
    return tuple(t.reshape(t.shape[0], t.shape[1], -1) for t in qkv)


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


def pixart_qkv(attn, x):
    """PixArt self-attention's own q, k, v (after its q/k norm) as (B, N, C)."""
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, c).unbind(2)
    return attn.q_norm(q), attn.k_norm(k), v


class SD3BlockPatch:
    """Object patch for ``joint_blocks.{i}.forward``: the core block mixing, rebuilt from the
    block's own pre_attention/post_attention, with EDiT attention where converted."""

    def __init__(self, original, block, index: int, attn=None, attn2=None):
        self.original = original
        self.block = block
        self.index = index
        self.attn = attn
        self.attn2 = attn2

    def __call__(self, *args, **kwargs):
        call = _active_call()
        if call is None:
            return self.original(*args, **kwargs)
        context, x = args[:2] if len(args) >= 2 else (kwargs["context"], kwargs["x"])
        c = kwargs.get("c", args[2] if len(args) > 2 else None)
        to = kwargs.get("transformer_options", call.transformer_options)
        return self.mix(context, x, c, to, call)

    def mix(self, context, x, c, to, call: EditCall):
        cb, xb = self.block.context_block, self.block.x_block
        heads = xb.attn.num_heads
        ctx_qkv, ctx_inter, x_qkv, x_qkv2, x_inter = sd3_pre_attention(self.block, context, x, c)
        n_txt = context.shape[1]
        block_inputs = dict(x=x, context=context, c=c)

        if call.student and self.attn is not None:
            o_txt, o_img = self.attn(x, *ctx_qkv, *x_qkv, call.grid, comfy_softmax(heads, to),
                                     prompt_rows=not cb.pre_only)
        else:
            qkv = [torch.cat((a, b), dim=1) for a, b in zip(ctx_qkv, x_qkv)]
            joint = comfy_attention.optimized_attention(*qkv, heads=heads, transformer_options=to)
            o_txt, o_img = joint[:, :n_txt], joint[:, n_txt:]
        if call.sink is not None and self.attn is not None:
            call.sink(f"joint_blocks.{self.index}.attn", call.grid, dict(block_inputs, out=o_img))

        attn2 = None
        if x_qkv2 is not None:
            if call.student and self.attn2 is not None:
                attn2 = self.attn2(x, *x_qkv2, call.grid)
            else:
                attn2 = comfy_attention.optimized_attention(*x_qkv2, heads=xb.attn2.num_heads, transformer_options=to)
            if call.sink is not None and self.attn2 is not None:
                call.sink(f"joint_blocks.{self.index}.attn2", call.grid, dict(block_inputs, out=attn2))

        context = None if cb.pre_only else cb.post_attention(o_txt, *ctx_inter)
        if x_qkv2 is not None:
            return context, xb.post_attention_x(o_img, attn2, *x_inter)
        return context, xb.post_attention(o_img, *x_inter)


class PixArtAttentionPatch:
    """Object patch for ``blocks.{i}.attn.forward``: linear compressed self-attention."""

    def __init__(self, original, attn_module, index: int, layer):
        self.original = original
        self.module = attn_module
        self.index = index
        self.layer = layer

    def __call__(self, x, *args, **kwargs):
        call = _active_call()
        if call is None:
            return self.original(x, *args, **kwargs)
        attn = self.module
        n = x.shape[1]
        if call.grid[0] * call.grid[1] != n:
            raise EDiTError(f"PixArt block {self.index}: {n} tokens do not fill the {call.grid} token grid")
        q, k, v = pixart_qkv(attn, x)
        if call.student:
            out = self.layer(x, q, k, v, call.grid)
        else:
            heads = attn.num_heads
            out = merge_heads(comfy_attention.optimized_attention(
                split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), heads,
                skip_reshape=True, skip_output_reshape=True, transformer_options=call.transformer_options))
        if call.sink is not None:
            call.sink(f"blocks.{self.index}.attn", call.grid, dict(x=x, out=out))
        return attn.proj(out)


def layer_inputs(diffusion_model, name: str, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Recompute a converted layer's attention inputs from what a capture sink recorded
    (SD3: the block inputs x, context, c; PixArt: the attention input x) with the model's
    own frozen projections: x, q, k, v and, for SD3 joint attention, k_txt, v_txt."""
    parts = name.split(".")
    block = getattr(diffusion_model, parts[0])[int(parts[1])]
    if parts[0] == "blocks":
        q, k, v = pixart_qkv(block.attn, inputs["x"])
        return dict(x=inputs["x"], q=q, k=k, v=v)
    ctx_qkv, _, x_qkv, x_qkv2, _ = sd3_pre_attention(block, inputs["context"], inputs["x"], inputs["c"])
    if parts[2] == "attn2":
        return dict(x=inputs["x"], q=x_qkv2[0], k=x_qkv2[1], v=x_qkv2[2])
    return dict(x=inputs["x"], q=x_qkv[0], k=x_qkv[1], v=x_qkv[2], q_txt=ctx_qkv[0], k_txt=ctx_qkv[1], v_txt=ctx_qkv[2])


PATCH_TYPES = (ModelForwardPatch, SD3BlockPatch, PixArtAttentionPatch)


def _original(patcher, name):
    obj = patcher.get_model_object(name)
    return obj.original if isinstance(obj, PATCH_TYPES) else obj


def apply_edit(patcher, bank: EDiTBank, options: EditOptions = EditOptions(), source: Optional[str] = None):
    """Return a clone of ``patcher`` with EDiT attention from ``bank``. The bank is checked
    against the model first; on any error nothing is patched and the input is untouched.
    Applying EDiT to an EDiT-patched model replaces the earlier bank and options."""
    spec = model_spec(patcher)
    check_bank_fits(bank.config, spec, source or bank.source or "the bank")
    selected = select_layers(bank.config.layers, options.layers)

    m = patcher.clone()
    for key in [k for k, v in m.object_patches.items() if isinstance(v, PATCH_TYPES)]:
        del m.object_patches[key]
    dm = m.get_model_object("diffusion_model")
    patches = {"diffusion_model.forward": ModelForwardPatch(_original(m, "diffusion_model.forward"), spec.family,
                                                            options, m.model)}
    if spec.family == "sd3":
        for i, block in enumerate(dm.joint_blocks):
            attn = bank.layer(f"joint_blocks.{i}.attn") if f"joint_blocks.{i}.attn" in selected else None
            attn2 = bank.layer(f"joint_blocks.{i}.attn2") if f"joint_blocks.{i}.attn2" in selected else None
            if attn is not None or attn2 is not None:
                key = f"diffusion_model.joint_blocks.{i}.forward"
                patches[key] = SD3BlockPatch(_original(m, key), block, i, attn, attn2)
    else:
        for i, block in enumerate(dm.blocks):
            if f"blocks.{i}.attn" in selected:
                key = f"diffusion_model.blocks.{i}.attn.forward"
                patches[key] = PixArtAttentionPatch(_original(m, key), block.attn, i, bank.layer(f"blocks.{i}.attn"))
    for key, patch in patches.items():
        m.add_object_patch(key, patch)
    bank_patcher = comfy.model_patcher.ModelPatcher(bank, load_device=m.load_device, offload_device=m.offload_device)
    m.set_additional_models(BANK_KEY, [bank_patcher])
    return m


def call_model(patcher, x, t, conds: Dict, mode: str, capture: Optional[CaptureSink] = None):
    """One call of a loaded EDiT-patched model outside a sampler (distillation, tests): the
    denoised prediction for latent ``x`` at sigma ``t`` with ``conds`` (c_crossattn, y, ...),
    EDiT forced to ``mode`` (TEACHER or STUDENT) and, optionally, a capture sink. The
    patcher's wrappers and transformer_options take part as they do inside a sampler."""
    import comfy.patcher_extension
    to = comfy.patcher_extension.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
    comfy.patcher_extension.merge_nested_dicts(to.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    to.update(edit_mode=mode, edit_capture=capture)
    return patcher.model.apply_model(x, t, transformer_options=to, **conds)


def edit_bank_of(patcher) -> Optional[EDiTBank]:
    """The bank an EDiT-patched model carries, or None."""
    models = patcher.get_additional_models_with_key(BANK_KEY)
    return models[0].model if models else None
