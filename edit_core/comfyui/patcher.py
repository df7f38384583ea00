"""Apply an EDiT bank to a ComfyUI model: a patched *clone*, never the shared base.

Mechanism (see docs/design.md):
- An ``APPLY_MODEL`` wrapper (``comfy.patcher_extension``, as the compile node uses) decides
  per call whether the EDiT (student) path runs (options, sampling range, image size, or an
  explicit ``transformer_options["edit_mode"]``), computes the token grid from the latent's
  shape and hands both, with an optional capture sink, to the converted layers as an
  ``EditCall``: in the call's ``transformer_options`` (SD3 blocks receive them) and in the
  application's ``EditState`` for the length of the call (PixArt drops transformer_options
  before its blocks). Both are plain values: torch.compile traces them without a graph break.
- Each converted layer gets an object patch from its family's adapter (sd3.py, pixart.py).
  The model's modules are always *called* (LoRA, lowvram and fp8 keep working); teacher
  calls and EDiT-off calls run the original forward untouched.
- ComfyUI applies object patches when it loads the clone and restores the originals when it
  unloads it; the bank rides along as an additional model (one ModelPatcher per bank),
  loaded and offloaded with it.
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch

import comfy.model_patcher
import comfy.patcher_extension

from ..bank import EDiTBank, EDiTError, check_bank_fits, select_layers
from .call import STUDENT, TEACHER, CaptureSink, EditState
from .family import FamilyAdapter
from .model import FAMILIES, family_of, model_spec

BANK_KEY = "edit_bank"
WRAPPER_KEY = "edit"
APPLY_MODEL = comfy.patcher_extension.WrappersMP.APPLY_MODEL
PATCH_TYPES = tuple(adapter.patch_type for adapter in FAMILIES.values())


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


class EditWrapper:
    """``APPLY_MODEL`` wrapper: the per-call EDiT decision and token grid for one application."""

    def __init__(self, family: FamilyAdapter, options: EditOptions, state: EditState):
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
        grid = self.family.token_grid(x.shape[-2:])
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


def layer_inputs(diffusion_model, name: str, inputs: Dict[str, torch.Tensor],
                 modulated: bool = False) -> Dict[str, torch.Tensor]:
    """Recompute a converted layer's attention inputs from what a capture sink recorded
    (SD3: the block inputs x, context, c; PixArt: the attention input x) with the model's
    own frozen projections: x (SD3: the residual stream), h (the qkv projection's input, the
    modulated one; PixArt: x itself; SD3: None unless ``modulated``), q, k, v and, for SD3
    joint attention, q_txt, k_txt, v_txt. ``edit_layer_args(cf_input, x, h)`` gives what a bank layer reads."""
    return family_of(diffusion_model).layer_inputs(diffusion_model, name, inputs, modulated)


class BankCache:
    """What applying a bank makes once and reuses for the bank's lifetime: its ModelPatcher
    per (load, offload) device pair (ComfyUI's loaded-model bookkeeping expects a patcher to
    live as long as its model) and its compiled layers per (name, backend). The bank itself
    holds it (``bank.comfy_cache``): a map outside the bank would keep every bank alive through
    its patcher."""

    def __init__(self):
        self.patchers = {}
        self.compiled = {}

    @classmethod
    def of(cls, bank: EDiTBank) -> "BankCache":
        if bank.comfy_cache is None:
            bank.comfy_cache = cls()
        return bank.comfy_cache

    def model_patcher(self, bank: EDiTBank, load_device, offload_device):
        key = (str(load_device), str(offload_device))
        if key not in self.patchers:
            self.patchers[key] = comfy.model_patcher.ModelPatcher(bank, load_device=load_device,
                                                                  offload_device=offload_device)
        return self.patchers[key]

    def layer(self, bank: EDiTBank, name: str, compile_backend: Optional[str]):
        """A bank layer, compiled with ``compile_backend`` if one is given."""
        layer = bank.layer(name)
        if compile_backend is None:
            return layer
        if (name, compile_backend) not in self.compiled:
            self.compiled[name, compile_backend] = torch.compile(layer, backend=compile_backend, dynamic=False)
        return self.compiled[name, compile_backend]


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
    family = FAMILIES[spec.family]
    cache = BankCache.of(bank)

    m = patcher.clone()
    for key in [k for k, v in m.object_patches.items() if isinstance(v, PATCH_TYPES)]:
        del m.object_patches[key]
    m.remove_wrappers_with_key(APPLY_MODEL, WRAPPER_KEY)
    state = EditState()

    def layer(name):
        return cache.layer(bank, name, options.compile_backend) if name in selected else None

    patches = family.layer_patches(m.get_model_object("diffusion_model"), layer, bank.config, state,
                                   lambda key: _original(m, key))
    for key, patch in patches.items():
        m.add_object_patch(key, patch)
    m.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, EditWrapper(family, options, state))
    m.set_additional_models(BANK_KEY, [cache.model_patcher(bank, m.load_device, m.offload_device)])
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
