"""The EDiT weight bank: the per-layer EDiT modules for one model, and its safetensors file.

A bank is built from a ``BankConfig`` (model family, width, heads, depth, converted layers,
hyper-parameters). Its tensors are named like the model's layers they replace, e.g.
``joint_blocks.3.attn.cf.conv.weight`` or ``blocks.7.attn.sc_k.weight``. The file is a
safetensors file whose metadata carries the config (and a training summary once trained);
loading rebuilds the expected bank from that config and refuses any file that does not
match it exactly, naming the file, what was expected and what was found.
"""
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .modules import DEFAULT_REDUCTION, EDiTAttention, HybridEDiTAttention

FORMAT_NAME = "comfyui-edit/bank"
FORMAT_VERSION = 1
FAMILIES = ("sd3", "pixart")


class EDiTError(ValueError):
    """A problem the user can fix: a wrong file, model or option. The message says what."""


@dataclass(frozen=True)
class ModelSpec:
    """What a bank must match in a model: family, width, heads, depth and the attention
    layers EDiT can convert, in model order.

    SD3/SD3.5: ``joint_blocks.{i}.attn`` (joint prompt+image attention, hybrid) for every
    block, ``joint_blocks.{i}.attn2`` (MMDiT-X image self-attention, linear) where present.
    PixArt: ``blocks.{i}.attn`` (image self-attention, linear).
    """
    family: str
    hidden_size: int
    heads: int
    depth: int
    layers: Tuple[str, ...]

    def describe(self) -> str:
        return f"{self.family}, hidden {self.hidden_size}, {self.heads} heads, depth {self.depth}"


def layer_kind(family: str, name: str) -> str:
    """'hybrid' for SD3 joint attention, 'linear' for image-only self-attention."""
    return "hybrid" if family == "sd3" and name.endswith(".attn") else "linear"


@dataclass(frozen=True)
class BankConfig:
    family: str
    hidden_size: int
    heads: int
    depth: int
    layers: Tuple[str, ...]
    reduction: int = DEFAULT_REDUCTION
    cf_kernel: int = 3
    sc_kernel: int = 3
    local_kernel: int = 3
    eta_mode: str = "learned"
    training: Dict = field(default_factory=dict, compare=False)

    def hparams(self) -> Dict:
        return {"reduction": self.reduction, "cf_kernel": self.cf_kernel, "sc_kernel": self.sc_kernel,
                "local_kernel": self.local_kernel, "eta_mode": self.eta_mode}

    def describe(self) -> str:
        return (f"{self.family}, hidden {self.hidden_size}, {self.heads} heads, depth {self.depth}, "
                f"{len(self.layers)} layers")


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
        self.layers = nn.ModuleDict()
        for name in config.layers:
            kind = layer_kind(config.family, name)
            if kind == "hybrid":
                module = HybridEDiTAttention(config.hidden_size, config.heads, reduction=config.reduction,
                                             eta_mode=config.eta_mode, cf_kernel=config.cf_kernel,
                                             sc_kernel=config.sc_kernel, local_kernel=config.local_kernel)
            else:
                module = EDiTAttention(config.hidden_size, config.heads, reduction=config.reduction,
                                       cf_kernel=config.cf_kernel, sc_kernel=config.sc_kernel,
                                       local_kernel=config.local_kernel)
            _nested_set(self.layers, name, module)

    def layer(self, name: str) -> nn.Module:
        return self.layers.get_submodule(name)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The file's tensors: ``{layer}.{parameter}`` (the ``layers.`` prefix dropped)."""
        return {k[len("layers."):]: v for k, v in self.state_dict().items()}


def init_bank(spec: ModelSpec, layers: Optional[Iterable[str]] = None, seed: int = 0, **hparams) -> EDiTBank:
    """An untrained bank for a model: zero-initialised ConvFusion (so it starts at ReLU linear
    attention over the model's own q, k, v), low-pass SpatialCompressor. Deterministic for a seed."""
    names = tuple(spec.layers if layers is None else layers)
    unknown = [n for n in names if n not in spec.layers]
    if unknown:
        raise EDiTError(f"layers {unknown} are not attention layers EDiT can convert in this model "
                        f"({spec.describe()}); convertible: {', '.join(spec.layers)}")
    if not names:
        raise EDiTError("no layers selected: a bank needs at least one layer")
    config = BankConfig(spec.family, spec.hidden_size, spec.heads, spec.depth,
                        tuple(n for n in spec.layers if n in names), **hparams)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EDiTBank(config)


def check_bank_fits(config: BankConfig, spec: ModelSpec, source: str = "the bank"):
    """Refuse a bank made for another model, naming what was expected and what was found."""
    found = (config.family, config.hidden_size, config.heads, config.depth)
    expected = (spec.family, spec.hidden_size, spec.heads, spec.depth)
    if found != expected:
        raise EDiTError(f"{source} was made for a different model: it is for {config.describe()}, "
                        f"but the model is {spec.describe()}")
    missing = [n for n in config.layers if n not in spec.layers]
    if missing:
        raise EDiTError(f"{source} has layers this model does not have: {', '.join(missing)} "
                        f"(model: {spec.describe()}, layers {', '.join(spec.layers)})")


def save_bank(bank: EDiTBank, path, training: Optional[Dict] = None):
    """Write the bank atomically (a temporary file renamed into place): an interrupted save
    never leaves a truncated file under the final name."""
    config = bank.config if training is None else replace(bank.config, training=training)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "family": config.family,
        "hidden_size": str(config.hidden_size),
        "heads": str(config.heads),
        "depth": str(config.depth),
        "layers": json.dumps(list(config.layers)),
        "hparams": json.dumps(config.hparams()),
        "training": json.dumps(config.training),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().float().contiguous().cpu() for k, v in bank.tensors().items()}, str(tmp), metadata)
    os.replace(tmp, path)
    bank.config = config


def _config_from_metadata(meta: Dict[str, str], path) -> BankConfig:
    if meta.get("format") != FORMAT_NAME:
        raise EDiTError(f"{path} is not an EDiT bank: its metadata has format {meta.get('format')!r}, "
                        f"expected {FORMAT_NAME!r} (is it a model or LoRA file?)")
    try:
        version = int(meta["format_version"])
    except (KeyError, ValueError):
        raise EDiTError(f"{path}: format_version {meta.get('format_version')!r} is not a number")
    if version > FORMAT_VERSION:
        raise EDiTError(f"{path} is EDiT bank format version {version}; this ComfyUI-EDiT reads versions "
                        f"up to {FORMAT_VERSION}: update ComfyUI-EDiT")
    try:
        hp = json.loads(meta["hparams"])
        config = BankConfig(meta["family"], int(meta["hidden_size"]), int(meta["heads"]), int(meta["depth"]),
                            tuple(json.loads(meta["layers"])), reduction=int(hp["reduction"]),
                            cf_kernel=int(hp["cf_kernel"]), sc_kernel=int(hp["sc_kernel"]),
                            local_kernel=int(hp["local_kernel"]), eta_mode=hp["eta_mode"],
                            training=json.loads(meta.get("training") or "{}"))
    except (KeyError, ValueError, TypeError) as e:
        raise EDiTError(f"{path}: EDiT bank metadata is incomplete or malformed ({type(e).__name__}: {e})")
    if config.family not in FAMILIES:
        raise EDiTError(f"{path}: unknown model family {config.family!r}, expected one of {FAMILIES}")
    return config


def load_bank(path) -> EDiTBank:
    """Read and fully validate a bank file; return the bank or raise EDiTError. Nothing is
    returned half-loaded: every tensor is checked before the bank is handed out."""
    path = Path(path)
    if not path.is_file():
        raise EDiTError(f"EDiT bank file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            config = _config_from_metadata(meta, path)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise EDiTError(f"{path} is not a readable safetensors file (truncated or another format?): {e}")
    bank = EDiTBank(config)
    expected = bank.tensors()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise EDiTError(f"{path} does not match its own config ({config.describe()}): "
                        f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                        f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    wrong = [f"{k}: expected {tuple(v.shape)}, found {tuple(tensors[k].shape)}"
             for k, v in expected.items() if tuple(tensors[k].shape) != tuple(v.shape)]
    if wrong:
        raise EDiTError(f"{path} has tensors of the wrong shape for {config.describe()}: " + "; ".join(wrong[:8]))
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise EDiTError(f"{path} has non-finite values in {', '.join(bad[:8])}")
    bank.layers.load_state_dict({k: v for k, v in tensors.items()})
    bank.source = str(path)
    return bank


def select_layers(config_layers: Sequence[str], selection: str) -> Tuple[str, ...]:
    """Parse a layer selection: 'all', or comma-separated block indices and ranges
    ('0-12, 20'), optionally restricted to a kind with a suffix ('0-12:attn2').

    Returns the bank layers selected, in bank order.
    """
    selection = (selection or "all").strip()
    if selection == "all":
        return tuple(config_layers)
    chosen = set()
    for part in selection.split(","):
        part = part.strip()
        if not part:
            continue
        span, _, attn = part.partition(":")
        try:
            lo, _, hi = span.partition("-")
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            raise EDiTError(f"layer selection {selection!r}: {part!r} is not a block index or range like '0-12'")
        for name in config_layers:
            block = int(name.split(".")[1])
            if lo <= block <= hi and (not attn or name.endswith("." + attn)):
                chosen.add(name)
    if not chosen:
        raise EDiTError(f"layer selection {selection!r} selects none of the bank's layers ({', '.join(config_layers)})")
    return tuple(n for n in config_layers if n in chosen)
