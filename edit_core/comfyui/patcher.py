"""Apply an EDiT bank to a ComfyUI model: a patched *clone*, never the shared base.

Mechanism (see docs/design.md):
- An ``APPLY_MODEL`` wrapper (``comfy.patcher_extension``, as the compile node uses) decides
  per call whether the EDiT (student) path runs (options, sampling range, image size, or an
  explicit ``transformer_options["edit_mode"]``), computes the token grid from the latent's
  shape and hands both, with an optional capture sink, to the converted layers as an
  ``EditCall``: in the call's ``transformer_options`` (SD3 blocks receive them) and in the
  application's ``EditState`` for the length of the call (PixArt drops transformer_options
  before its blocks). Both are plain values: torch.compile traces them without a graph break.
- Each converted layer gets an object patch: SD3 ``joint_blocks.{i}.forward`` calls the
  block's own forward (core block mixing, ``use_checkpoint`` and unknown keyword arguments
  passed on) with an ``optimized_attention_override`` that swaps only the attention: joint
  attention becomes MM-EDiT hybrid attention, an MMDiT-X ``attn2`` linear compressed
  attention. PixArt ``blocks.{i}.attn.forward`` runs linear compressed attention between the
  module's own ``qkv`` and ``proj``. The model's modules are always *called* (LoRA, lowvram
  and fp8 keep working); softmax parts go through ComfyUI's attention function looked up at
  call time (backend overrides compose). Teacher calls and EDiT-off calls run the original
  forward untouched.
- ComfyUI applies object patches when it loads the clone and restores the originals when it
  unloads it; the bank rides along as an additional model (one ModelPatcher per bank),
  loaded and offloaded with it.
"""
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.ldm.modules.diffusionmodules.mmdit as comfy_mmdit
import comfy.model_patcher
import comfy.patcher_extension

from ..bank import EDiTBank, EDiTError, check_bank_fits, select_layers
from .model import model_spec
from ..attention.layers import merge_heads, split_heads

TEACHER, STUDENT = "teacher", "student"
BANK_KEY = "edit_bank"
WRAPPER_KEY = "edit"
CALL_KEY = "edit_call"  # transformer_options key of the running EditCall
APPLY_MODEL = comfy.patcher_extension.WrappersMP.APPLY_MODEL

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
    compile_backend: None (the default) runs the EDiT layers eagerly; a torch.compile backend
        name (e.g. "inductor") compiles each EDiT layer on its own, once per bank and shape.
    """
    enabled: bool = True
    layers: str = "all"
    start_percent: float = 0.0
    end_percent: float = 1.0
    min_tokens: int = 0
    compile_backend: Optional[str] = None

    def __post_init__(self):
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise EDiTError(f"sampling range must satisfy 0 <= start_percent <= end_percent <= 1, got "
                            f"{self.start_percent}..{self.end_percent}")
        if self.min_tokens < 0:
            raise EDiTError(f"min_tokens must be >= 0, got {self.min_tokens}")


@dataclass(frozen=True)
class EditCall:
    """One model call's EDiT decision, made by the wrapper of the application ``owner``."""
    owner: "EditState"
    student: bool
    grid: Tuple[int, int]
    sink: Optional[CaptureSink] = None

    @property
    def active(self) -> bool:
        """Whether the patched layers do anything but call the original (EDiT or capture)."""
        return self.student or self.sink is not None


class EditState:
    """One Apply EDiT's per-call state: the running call, set by its wrapper for the length
    of that call (PixArt's layers cannot receive transformer_options), and whether the
    layers have warned about a call the wrapper did not see."""

    def __init__(self):
        self.call: Optional[EditCall] = None
        self.warned = False

    @contextmanager
    def running(self, student: bool, grid: Tuple[int, int], sink: Optional[CaptureSink] = None,
                transformer_options: Optional[dict] = None):
        """Run the EDiT (student) or original (teacher) path in this application's patched
        layers called inside; yields the transformer_options (a copy) to call them with."""
        call = EditCall(self, student, grid, sink)
        previous, self.call = self.call, call
        try:
            yield dict(transformer_options or {}, **{CALL_KEY: call})
        finally:
            self.call = previous

    @contextmanager
    def resumed(self, call: Optional["EditCall"]):
        """Run the patched layers under an earlier call's decision again: activation
        checkpointing recomputes a block during backward, after its call has ended."""
        previous, self.call = self.call, call
        try:
            yield
        finally:
            self.call = previous

    def unseen(self, layer: str):
        """A patched layer ran in a call this application's wrapper did not see: it runs the
        original attention; say so once per model."""
        if not self.warned:
            self.warned = True
            logging.warning(f"EDiT: {layer} ran in a model call that EDiT's wrapper did not see (the model was "
                            "called without its patcher's wrappers, e.g. model.apply_model without "
                            "transformer_options['wrappers']); the original attention runs for such calls. "
                            "Call it through a sampler or edit_core.comfyui.patcher.call_model.")


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


class EditWrapper:
    """``APPLY_MODEL`` wrapper: the per-call EDiT decision and token grid for one application."""

    def __init__(self, family: str, options: EditOptions, state: EditState):
        self.family = family
        self.options = options
        self.state = state

    def in_sampling_range(self, model_sampling, sigmas) -> bool:
        if (self.options.start_percent, self.options.end_percent) == (0.0, 1.0):
            return True
        sigma = float(sigmas.reshape(-1)[0])
        return (model_sampling.percent_to_sigma(self.options.end_percent) <= sigma
                <= model_sampling.percent_to_sigma(self.options.start_percent))

    def __call__(self, executor, *args, **kwargs):
        # BaseModel.apply_model's executor arguments: x, t, c_concat, c_crossattn, control, transformer_options.
        x, t = args[0], args[1]
        positional = len(args) > 5
        to = (args[5] if positional else kwargs.get("transformer_options")) or {}
        grid = token_grid(self.family, x.shape[-2:])
        mode = to.get("edit_mode")
        if mode not in (None, TEACHER, STUDENT):
            raise EDiTError(f"transformer_options['edit_mode'] must be {TEACHER!r} or {STUDENT!r}, got {mode!r}")
        if mode is None:
            # The base model's model_sampling at call time: a sampling node may have patched it.
            student = (self.options.enabled and grid[0] * grid[1] >= self.options.min_tokens
                       and self.in_sampling_range(executor.class_obj.model_sampling,
                                                  t if to.get("sigmas") is None else to["sigmas"]))
        else:
            student = mode == STUDENT
        with self.state.running(student, grid, to.get("edit_capture"), to) as call_options:
            if positional:
                args = (*args[:5], call_options, *args[6:])
            else:
                kwargs["transformer_options"] = call_options
            return executor(*args, **kwargs)


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


def edit_layer_args(cf_input: str, x, h):
    """(ConvFusion's input, the qkv update's input) of a layer whose bank reads ConvFusion from
    ``cf_input``: x is the block's residual stream (SD3) or the attention input (PixArt), h
    the modulated attention input (None where nothing reads it)."""
    return (h if cf_input == "modulated" else x), h


def pixart_qkv(attn, x):
    """PixArt self-attention's own q, k, v (after its q/k norm) as (B, N, C)."""
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, c).unbind(2)
    return attn.q_norm(q), attn.k_norm(k), v


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


def layer_inputs(diffusion_model, name: str, inputs: Dict[str, torch.Tensor],
                 modulated: bool = False) -> Dict[str, torch.Tensor]:
    """Recompute a converted layer's attention inputs from what a capture sink recorded
    (SD3: the block inputs x, context, c; PixArt: the attention input x) with the model's
    own frozen projections: x (SD3: the residual stream), h (the qkv projection's input, the
    modulated one; PixArt: x itself; SD3: None unless ``modulated``), q, k, v and, for SD3
    joint attention, k_txt, v_txt. ``edit_layer_args(cf_input, x, h)`` gives what a bank layer reads."""
    parts = name.split(".")
    block = getattr(diffusion_model, parts[0])[int(parts[1])]
    if parts[0] == "blocks":
        q, k, v = pixart_qkv(block.attn, inputs["x"])
        return dict(x=inputs["x"], h=inputs["x"], q=q, k=k, v=v)
    ctx_qkv, _, x_qkv, x_qkv2, _ = sd3_pre_attention(block, inputs["context"], inputs["x"], inputs["c"])
    h = sd3_modulated_input(block.x_block, inputs["x"], inputs["c"], parts[2] == "attn2") if modulated else None
    if parts[2] == "attn2":
        return dict(x=inputs["x"], h=h, q=x_qkv2[0], k=x_qkv2[1], v=x_qkv2[2])
    return dict(x=inputs["x"], h=h, q=x_qkv[0], k=x_qkv[1], v=x_qkv[2], q_txt=ctx_qkv[0], k_txt=ctx_qkv[1],
                v_txt=ctx_qkv[2])


PATCH_TYPES = (SD3BlockPatch, PixArtAttentionPatch)
BANK_PATCHERS = "_edit_model_patchers"  # attribute of a bank: its ModelPatcher per (load, offload) device
BANK_COMPILED = "_edit_compiled_layers"  # attribute of a bank: its compiled layers per (name, backend)


def _original(patcher, name):
    obj = patcher.get_model_object(name)
    return obj.original if isinstance(obj, PATCH_TYPES) else obj


def bank_model_patcher(bank: EDiTBank, load_device, offload_device):
    """The one ModelPatcher of ``bank`` for these devices, kept on the bank for its lifetime:
    ComfyUI's loaded-model bookkeeping expects a patcher to live as long as its model."""
    patchers = bank.__dict__.setdefault(BANK_PATCHERS, {})
    key = (str(load_device), str(offload_device))
    if key not in patchers:
        patchers[key] = comfy.model_patcher.ModelPatcher(bank, load_device=load_device, offload_device=offload_device)
    return patchers[key]


def bank_layer(bank: EDiTBank, name: str, compile_backend: Optional[str]):
    """A bank layer, compiled with ``compile_backend`` if one is given (kept on the bank, so
    applying the bank again reuses what was compiled)."""
    layer = bank.layer(name)
    if compile_backend is None:
        return layer
    compiled = bank.__dict__.setdefault(BANK_COMPILED, {})
    if (name, compile_backend) not in compiled:
        compiled[name, compile_backend] = torch.compile(layer, backend=compile_backend, dynamic=False)
    return compiled[name, compile_backend]


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
    m.remove_wrappers_with_key(APPLY_MODEL, WRAPPER_KEY)
    dm = m.get_model_object("diffusion_model")
    state = EditState()
    patches = {}
    def layer(name):
        return bank_layer(bank, name, options.compile_backend) if name in selected else None

    if spec.family == "sd3":
        for i, block in enumerate(dm.joint_blocks):
            attn, attn2 = layer(f"joint_blocks.{i}.attn"), layer(f"joint_blocks.{i}.attn2")
            if attn is not None or attn2 is not None:
                key = f"diffusion_model.joint_blocks.{i}.forward"
                patches[key] = SD3BlockPatch(_original(m, key), block, i, attn, attn2, state,
                                             cf_input=bank.config.cf_input, qkv_update=bank.config.qkv_rank > 0)
    else:
        for i, block in enumerate(dm.blocks):
            if f"blocks.{i}.attn" in selected:
                key = f"diffusion_model.blocks.{i}.attn.forward"
                patches[key] = PixArtAttentionPatch(_original(m, key), block.attn, i, layer(f"blocks.{i}.attn"), state)
    for key, patch in patches.items():
        m.add_object_patch(key, patch)
    m.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, EditWrapper(spec.family, options, state))
    m.set_additional_models(BANK_KEY, [bank_model_patcher(bank, m.load_device, m.offload_device)])
    return m


def add_wrapper_outside_edit(patcher, key: str, wrapper):
    """Add an ``APPLY_MODEL`` wrapper that runs outside EDiT's (ComfyUI runs a model's wrappers
    in the order they were added, first outermost): one that sets ``edit_mode`` or
    ``edit_capture`` in transformer_options must, for EDiT's wrapper to see them."""
    wrappers = patcher.wrappers.setdefault(APPLY_MODEL, {})
    edit = wrappers.pop(WRAPPER_KEY, None)
    wrappers.setdefault(key, []).append(wrapper)
    if edit is not None:
        wrappers[WRAPPER_KEY] = edit


def model_call_options(patcher, **extra) -> dict:
    """transformer_options for calling ``patcher.model.apply_model`` outside a sampler the way a
    sampler does: the patcher's transformer_options and wrappers (EDiT's among them), plus ``extra``."""
    to = comfy.patcher_extension.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
    comfy.patcher_extension.merge_nested_dicts(to.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    to.update(extra)
    return to


def call_model(patcher, x, t, conds: Dict, mode: str, capture: Optional[CaptureSink] = None):
    """One call of a loaded EDiT-patched model outside a sampler (distillation, tests): the
    denoised prediction for latent ``x`` at sigma ``t`` with ``conds`` (c_crossattn, y, ...),
    EDiT forced to ``mode`` (TEACHER or STUDENT) and, optionally, a capture sink. The
    patcher's wrappers and transformer_options take part as they do inside a sampler."""
    to = model_call_options(patcher, edit_mode=mode, edit_capture=capture)
    return patcher.model.apply_model(x, t, transformer_options=to, **conds)


def edit_state_of(patcher) -> Optional[EditState]:
    """The per-call state of the Apply EDiT on ``patcher``, or None."""
    wrappers = patcher.get_wrappers(APPLY_MODEL, WRAPPER_KEY)
    return wrappers[0].state if wrappers else None


def edit_bank_of(patcher) -> Optional[EDiTBank]:
    """The bank an EDiT-patched model carries, or None."""
    models = patcher.get_additional_models_with_key(BANK_KEY)
    return models[0].model if models else None
