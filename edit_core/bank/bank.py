"""The bank module: the EDiT modules of one model, addressable by layer name, and how a new
one is made (``init_bank``) or checked against a model (``check_bank_fits``)."""
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from ..attention.layers import EDiTAttention, HybridEDiTAttention
from ..errors import EDiTError
from .design import DEFAULT_DESIGN, HPARAMS, BankConfig, ModelSpec, family_hparam_problem, hparam_problem
from .families import BANK_FAMILIES


def layer_kind(family: str, name: str) -> str:
    """'hybrid' where prompt tokens take part (SD3 joint attention), 'linear' for image-only
    self-attention."""
    return BANK_FAMILIES[family].layer_kind(name)


def _nested_set(root: nn.ModuleDict, name: str, module: nn.Module):
    *path, leaf = name.split(".")
    node = root
    for part in path:
        if part not in node:
            node[part] = nn.ModuleDict()
        node = node[part]
    node[leaf] = module


class EDiTBank(nn.Module):
    """The EDiT modules of one model, addressable by layer name (``bank.layer(name)``)."""

    def __init__(self, config: BankConfig):
        super().__init__()
        self.config = config
        self.source: Optional[str] = None  # the file it was loaded from, for error messages
        # What the ComfyUI seam makes once for this bank (comfyui.patcher.BankCache); never saved.
        self.comfy_cache = None
        self.layers = nn.ModuleDict()
        for name in config.layers:
            kind = layer_kind(config.family, name)
            common = dict(reduction=config.reduction, cf_kernel=config.cf_kernel, sc_kernel=config.sc_kernel,
                          local_kernel=config.local_kernel, sc_stride=config.sc_stride, qkv_rank=config.qkv_rank)
            if kind == "hybrid":
                module = HybridEDiTAttention(config.hidden_size, config.heads, eta_mode=config.eta_mode,
                                             local_placement=config.local_placement, **common)
            else:
                module = EDiTAttention(config.hidden_size, config.heads, **common)
            _nested_set(self.layers, name, module)

    def layer(self, name: str) -> nn.Module:
        return self.layers.get_submodule(name)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The file's tensors: ``{layer}.{parameter}`` (the ``layers.`` prefix dropped)."""
        return {k[len("layers."):]: v for k, v in self.state_dict().items()}


def new_bank_config(spec: ModelSpec, layers: Sequence[str], **hparams) -> BankConfig:
    """The config of a new bank for ``layers`` of a model: DEFAULT_DESIGN with ``hparams`` over
    it, checked (what load_bank would refuse is never made)."""
    config = BankConfig(spec.family, spec.hidden_size, spec.heads, spec.depth, tuple(layers),
                        **dict(DEFAULT_DESIGN, **hparams))
    for key in sorted(HPARAMS):
        value = getattr(config, key)
        problem = hparam_problem(key, value) or family_hparam_problem(config.family, key, value)
        if problem:
            raise EDiTError(f"{key} {value!r}: must be {problem}")
    return config


def init_bank(spec: ModelSpec, layers: Optional[Iterable[str]] = None, seed: int = 0, **hparams) -> EDiTBank:
    """An untrained bank for a model: zero-initialised ConvFusion and q/k/v update (so it starts
    at ReLU linear attention over the model's own q, k, v), identity or low-pass
    SpatialCompressor. Deterministic for a seed.

    ``hparams`` (each overrides DEFAULT_DESIGN, which overrides the BankConfig field defaults):
    reduction, cf_kernel (0: no ConvFusion), sc_kernel, local_kernel (0: no local branch),
    eta_mode, and the student-design options sc_stride (2, or 1: no compression with
    sc_kernel=1), qkv_rank (0: off), local_placement ('inside' or 'outside' the eta-weighted
    term; the same on PixArt, which has no eta) and cf_input (SD3: 'residual' or 'modulated';
    PixArt: 'modulated' only). Unknown names are a TypeError."""
    names = tuple(spec.layers if layers is None else layers)
    unknown = [n for n in names if n not in spec.layers]
    if unknown:
        raise EDiTError(f"layers {unknown} are not attention layers EDiT can convert in this model "
                        f"({spec.describe()}); convertible: {', '.join(spec.layers)}")
    if not names:
        raise EDiTError("no layers selected: a bank needs at least one layer; select some, or 'all'")
    config = new_bank_config(spec, tuple(n for n in spec.layers if n in names), **hparams)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EDiTBank(config)


def check_bank_fits(config: BankConfig, spec: ModelSpec, source: str = "the bank"):
    """Refuse a bank made for another model, naming what was expected and what was found."""
    found = (config.family, config.hidden_size, config.heads, config.depth)
    expected = (spec.family, spec.hidden_size, spec.heads, spec.depth)
    if found != expected:
        raise EDiTError(f"{source} was made for a different model: it is for {config.describe()}, "
                        f"but the model is {spec.describe()}. Load the bank made for this model, or make one for "
                        "it with EDiT Distill")
    missing = [n for n in config.layers if n not in spec.layers]
    if missing:
        raise EDiTError(f"{source} has layers this model does not have: {', '.join(missing)} "
                        f"(model: {spec.describe()}, layers {', '.join(spec.layers)}). Load the bank made for this "
                        "model, or make one for it with EDiT Distill")
