"""The bank's safetensors file: its name rules, writing it, and reading it back with every
field and tensor checked.

The metadata carries the config (and a training summary once trained); loading rebuilds
the expected bank from that config and refuses any file that does not match it exactly,
naming the file, what was expected and what was found.
"""
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open

from ..errors import EDiTError
from ..util.safetensors_io import save_safetensors
from .bank import EDiTBank, layer_kind
from .families import BANK_FAMILIES
from .design import (FAMILIES, HPARAMS, OPTIONAL_HPARAMS, BankConfig, family_hparam_problem, hparam_problem,
                     original_options)

FORMAT_NAME = "comfyui-edit/bank"
FORMAT_VERSION = 1
# What a bank's metadata may claim. Generous for the families' real models (SD3.5 Large:
# depth 38, hidden 2432; PixArt-Sigma: depth 28, hidden 1152); the tensor shapes in the file's
# header must then match the claim exactly, so a small file cannot claim a big model.
MAX_DEPTH = 64
MAX_HEADS = 256
MAX_HIDDEN = 16384
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
REMAKE = "Use another bank, or make this one again with EDiT Distill and Save EDiT."

BANK_NAME_FORBIDDEN = set('/\\:*?"<>|')  # folders, and characters Windows refuses in names
# Leaves room, under the usual 255-byte limit, for Save EDiT's '_00001.safetensors' and the
# temporary name the file is written under.
MAX_BANK_NAME_BYTES = 200


def bank_file_stem(filename: str) -> str:
    """The file name (without '.safetensors') Save EDiT writes for ``filename``: a plain name
    in models/edit. Anything else is an EDiTError, raised before anything is written."""
    stem = (filename or "").strip()
    stem = stem[:-len(".safetensors")] if stem.endswith(".safetensors") else stem
    if not stem:
        return "edit_bank"
    bad = sorted({c for c in stem if c in BANK_NAME_FORBIDDEN or ord(c) < 32 or ord(c) == 127})
    if bad:
        raise EDiTError(f"Save EDiT: the file name {filename!r} contains {' '.join(repr(c) for c in bad)}; "
                        "give a plain file name (no folders or control characters): the bank is saved in models/edit")
    if stem.startswith("."):
        raise EDiTError(f"Save EDiT: the file name {filename!r} starts with a dot (a hidden file, which EDiT Loader "
                        "does not list); give a name that starts with a letter or digit")
    size = len(stem.encode("utf-8"))
    if size > MAX_BANK_NAME_BYTES:
        raise EDiTError(f"Save EDiT: the file name {stem[:40]!r}... is {size} bytes long; give a name of at most "
                        f"{MAX_BANK_NAME_BYTES} bytes (characters outside ASCII take 2-4 bytes)")
    return stem


def save_bank(bank: EDiTBank, path, training: Optional[Dict] = None):
    """Write the bank atomically: an interrupted save never leaves a truncated file under the
    final name."""
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
    save_safetensors({k: v.float() for k, v in bank.tensors().items()}, path, metadata)
    bank.config = config


def _refusal(path, field: str, expected: str, found) -> EDiTError:
    return EDiTError(f"{path}: bank metadata field {field!r} must be {expected}, found {found!r}. The file is damaged "
                     f"or was not written by ComfyUI-EDiT. {REMAKE}")


def _int_field(meta: Dict[str, str], path, field: str, low: int, high: int) -> int:
    """A metadata number: plain ASCII digits (int() would also take '１', '1_0' and ' 1')."""
    text = meta.get(field)
    if not isinstance(text, str) or not re.fullmatch(r"[0-9]{1,9}", text) or not low <= int(text) <= high:
        raise _refusal(path, field, f"a whole number from {low} to {high}", text)
    return int(text)


def _json_field(meta: Dict[str, str], path, field: str, kind: type, default=None):
    """A metadata field holding JSON of one type (list or dict); ``default`` when absent."""
    text = meta.get(field)
    if text is None and default is not None:
        return default
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        value = None
    if not isinstance(value, kind):
        raise _refusal(path, field, "a JSON " + ("object" if kind is dict else "list"), text)
    return value


def _config_from_metadata(meta: Dict[str, str], path) -> BankConfig:
    """The bank's config from its metadata, every field checked for type, range and
    consistency (no tensor or module is made here)."""
    if meta.get("format") != FORMAT_NAME:
        raise EDiTError(f"{path} is not an EDiT bank: its metadata has format {meta.get('format')!r}, "
                        f"expected {FORMAT_NAME!r} (is it a model or LoRA file?). Pick a bank saved by Save EDiT")
    text = meta.get("format_version")
    if not isinstance(text, str) or not re.fullmatch(r"[0-9]{1,9}", text):
        raise _refusal(path, "format_version", "a whole number", text)
    if int(text) > FORMAT_VERSION:
        raise EDiTError(f"{path} is EDiT bank format version {text}; this ComfyUI-EDiT reads versions "
                        f"up to {FORMAT_VERSION}: update ComfyUI-EDiT")
    family = meta.get("family")
    if family not in FAMILIES:
        raise _refusal(path, "family", f"one of {', '.join(FAMILIES)}", family)
    hidden = _int_field(meta, path, "hidden_size", 1, MAX_HIDDEN)
    heads = _int_field(meta, path, "heads", 1, MAX_HEADS)
    depth = _int_field(meta, path, "depth", 1, MAX_DEPTH)
    if hidden % heads:
        raise _refusal(path, "hidden_size", f"heads ({heads}) x head width, a multiple of {heads}", str(hidden))
    layers = _json_field(meta, path, "layers", list)
    pattern = BANK_FAMILIES[family].layer_pattern
    for name in layers:
        match = re.fullmatch(pattern, name) if isinstance(name, str) else None
        if not match or int(match.group(1)) >= depth:
            raise _refusal(path, "layers", f"a list of {family} attention layer names like "
                           f"{BANK_FAMILIES[family].layer_examples} with block indices below depth {depth}", name)
    if not layers or len(set(layers)) != len(layers):
        raise _refusal(path, "layers", "a non-empty list of distinct layer names", meta["layers"])
    hp = _json_field(meta, path, "hparams", dict)
    unknown = sorted(set(hp) - HPARAMS)
    if unknown:
        raise _refusal(path, "hparams", f"an object with the keys {', '.join(sorted(HPARAMS - OPTIONAL_HPARAMS))} "
                       f"and optionally {', '.join(sorted(OPTIONAL_HPARAMS))}", unknown)
    hp = dict(original_options(family), **hp)  # a bank from before an option: the original design, not DEFAULT_DESIGN
    for key in sorted(HPARAMS):
        problem = hparam_problem(key, hp.get(key)) or family_hparam_problem(family, key, hp.get(key))
        if problem:
            raise _refusal(path, f"hparams.{key}", problem, hp.get(key))
    return BankConfig(family, hidden, heads, depth, tuple(layers), **hp,
                      training=_json_field(meta, path, "training", dict, default={}))


def expected_shapes(config: BankConfig) -> Dict[str, Tuple[int, ...]]:
    """The tensor names and shapes of a bank with this config, from the modules themselves
    built on the meta device (no memory behind them), one per kind of layer: every layer of
    a kind has the same parameters."""
    params = {}  # kind -> {parameter: shape}
    with torch.device("meta"):
        for name in config.layers:
            kind = layer_kind(config.family, name)
            if kind not in params:
                sample = EDiTBank(replace(config, layers=(name,)))
                params[kind] = {k[len(name) + 1:]: tuple(v.shape) for k, v in sample.tensors().items()}
    return {f"{name}.{p}": shape for name in config.layers
            for p, shape in params[layer_kind(config.family, name)].items()}


def load_bank(path) -> EDiTBank:
    """Read and fully validate a bank file; return the bank or raise EDiTError.

    The metadata and the tensor names, shapes and dtypes in the file's header are checked
    before any tensor is read or any real module is built, so a file that claims a huge
    model is refused without allocating it. Nothing is returned half-loaded."""
    path = Path(path)
    if not path.is_file():
        raise EDiTError(f"EDiT bank file not found: {path}. Check the name, or put the bank in models/edit")
    try:
        with safe_open(str(path), framework="pt") as f:
            config = _config_from_metadata(f.metadata() or {}, path)
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            expected = expected_shapes(config)
            missing = sorted(set(expected) - set(header))
            unexpected = sorted(set(header) - set(expected))
            if missing or unexpected:
                raise EDiTError(f"{path} does not match its own config ({config.describe()}): "
                                f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                                f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. "
                                f"{REMAKE}")
            wrong = [f"{k}: expected {shape}, found {header[k][0]}" for k, shape in expected.items()
                     if header[k][0] != shape]
            if wrong:
                raise EDiTError(f"{path} has tensors of the wrong shape for {config.describe()}: "
                                + "; ".join(wrong[:8]) + f". {REMAKE}")
            not_float = [f"{k} ({dtype})" for k, (_, dtype) in header.items() if dtype not in FLOAT_DTYPES]
            if not_float:
                raise EDiTError(f"{path}: tensors {', '.join(not_float[:8])} are not floating point "
                                f"(expected {', '.join(FLOAT_DTYPES)}). {REMAKE}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise EDiTError(f"{path} is not a readable safetensors file (truncated or another format?): {e}. {REMAKE}")
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise EDiTError(f"{path} has non-finite values in {', '.join(bad[:8])}. {REMAKE}")
    bank = EDiTBank(config)
    bank.layers.load_state_dict(tensors)
    bank.source = str(path)
    return bank
