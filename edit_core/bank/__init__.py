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
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..attention.layers import DEFAULT_REDUCTION, LOCAL_PLACEMENTS, EDiTAttention, HybridEDiTAttention

FORMAT_NAME = "comfyui-edit/bank"
FORMAT_VERSION = 1
FAMILIES = ("sd3", "pixart")
# What a bank's metadata may claim. Generous for the families' real models (SD3.5 Large:
# depth 38, hidden 2432; PixArt-Sigma: depth 28, hidden 1152); the tensor shapes in the file's
# header must then match the claim exactly, so a small file cannot claim a big model.
MAX_DEPTH = 64
MAX_HEADS = 256
MAX_HIDDEN = 16384
MAX_KERNEL = 15
MAX_REDUCTION = 1024
MAX_QKV_RANK = 256
LAYER_PATTERNS = {"sd3": r"joint_blocks\.(0|[1-9][0-9]{0,2})\.attn2?", "pixart": r"blocks\.(0|[1-9][0-9]{0,2})\.attn"}
LAYER_EXAMPLES = {"sd3": "'joint_blocks.0.attn' or 'joint_blocks.0.attn2'", "pixart": "'blocks.0.attn'"}
ETA_MODES = ("learned", "ratio")
CF_INPUTS = ("residual", "modulated")
# What ConvFusion reads where a bank does not say: SD3's blocks hand it the raw residual
# stream x (before norm1 and the adaLN modulation), PixArt's attention its modulated input.
DEFAULT_CF_INPUT = {"sd3": "residual", "pixart": "modulated"}
# The other student-design options (issue 11) as the banks written before they existed have
# them (the BankConfig field defaults too): a file's hparams that lack one load as this.
OPTION_DEFAULTS = {"sc_stride": 2, "qkv_rank": 0, "local_placement": "inside"}
# The student design a new bank gets where no option says otherwise (init_bank, and through it
# the nodes, the distill CLI, the tiny models and the benchmarks): the design the fidelity study
# picked (docs/fidelity.md, design d): no k/v compression. The one place to switch the default;
# the other hyper-parameters keep their BankConfig field defaults.
DEFAULT_DESIGN = {"sc_kernel": 1, "sc_stride": 1}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
REMAKE = "Use another bank, or make this one again with EDiT Distill and Save EDiT."


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
    """A bank's model, layers and hyper-parameters. The field defaults are the legacy design
    (what a file's missing keys mean); a new bank gets DEFAULT_DESIGN through new_bank_config."""
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
    sc_stride: int = OPTION_DEFAULTS["sc_stride"]
    qkv_rank: int = OPTION_DEFAULTS["qkv_rank"]
    local_placement: str = OPTION_DEFAULTS["local_placement"]
    cf_input: Optional[str] = None  # None: the family's DEFAULT_CF_INPUT
    training: Dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.cf_input is None:
            object.__setattr__(self, "cf_input", DEFAULT_CF_INPUT.get(self.family))

    def option_defaults(self) -> Dict:
        """The optional student-design options (issue 11) as the banks written before them have them."""
        return legacy_options(self.family)

    def hparams(self) -> Dict:
        """The hyper-parameters a bank file stores. Optional options at their legacy values are
        left out: a legacy-design bank's file (and the fingerprints of its runs) stay as before,
        and a file without them loads as that design."""
        base = {"reduction": self.reduction, "cf_kernel": self.cf_kernel, "sc_kernel": self.sc_kernel,
                "local_kernel": self.local_kernel, "eta_mode": self.eta_mode}
        return dict(base, **{k: getattr(self, k) for k, default in self.option_defaults().items()
                             if getattr(self, k) != default})

    def describe(self) -> str:
        return (f"{self.family}, hidden {self.hidden_size}, {self.heads} heads, depth {self.depth}, "
                f"{len(self.layers)} layers")


def legacy_options(family: str) -> Dict:
    """The optional hyper-parameters of a bank written before they existed, for ``family``."""
    return dict(OPTION_DEFAULTS, cf_input=DEFAULT_CF_INPUT.get(family))


def _odd_kernel(size: int) -> bool:
    return 1 <= size <= MAX_KERNEL and size % 2 == 1


_KERNEL = f"an odd whole number from 1 to {MAX_KERNEL}"
HPARAM_RULES = {  # hyper-parameter: (what it must be, test)
    "reduction": (f"a whole number from 1 to {MAX_REDUCTION}", lambda r: 1 <= r <= MAX_REDUCTION),
    "cf_kernel": (_KERNEL + " or 0 (no ConvFusion)", lambda k: k == 0 or _odd_kernel(k)),
    "sc_kernel": (_KERNEL, _odd_kernel),
    "local_kernel": (_KERNEL + " or 0 (no local branch)", lambda k: k == 0 or _odd_kernel(k)),
    "eta_mode": (f"one of {', '.join(ETA_MODES)}", lambda mode: mode in ETA_MODES),
    "sc_stride": ("1 or 2 (1: no compression with sc_kernel 1)", lambda s: s in (1, 2)),
    "qkv_rank": (f"a whole number from 0 to {MAX_QKV_RANK} (0: no low-rank q/k/v update)",
                 lambda r: 0 <= r <= MAX_QKV_RANK),
    "local_placement": (f"one of {', '.join(LOCAL_PLACEMENTS)}", lambda p: p in LOCAL_PLACEMENTS),
    "cf_input": (f"one of {', '.join(CF_INPUTS)}", lambda i: i in CF_INPUTS),
}
HPARAMS = set(HPARAM_RULES)
OPTIONAL_HPARAMS = set(OPTION_DEFAULTS) | {"cf_input"}  # absent from older banks
TEXT_HPARAMS = {"eta_mode", "local_placement", "cf_input"}
# The legacy design: the BankConfig field defaults (cf_input None: the family's DEFAULT_CF_INPUT).
LEGACY_HPARAMS = {f.name: f.default for f in fields(BankConfig) if f.name in HPARAMS}


def default_hparam(key: str):
    """What a new bank gets for hyper-parameter ``key`` when no option says: DEFAULT_DESIGN's
    value, else the legacy one. The defaults the node widgets and the CLI flags show."""
    return DEFAULT_DESIGN.get(key, LEGACY_HPARAMS[key])


def hparam_problem(key: str, value) -> Optional[str]:
    """None if ``value`` is a valid ``key`` hyper-parameter, else what it must be."""
    expected, ok = HPARAM_RULES[key]
    kind = str if key in TEXT_HPARAMS else int
    return None if type(value) is kind and ok(value) else expected  # type(): a JSON true is no number


def family_hparam_problem(family: str, key: str, value) -> Optional[str]:
    """None if a valid hyper-parameter fits the family, else what it must be there."""
    if key == "cf_input" and family == "pixart" and value != "modulated":
        return ("'modulated' for pixart (its attention input is the modulated one; only SD3 can read the "
                "residual stream)")
    return None


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


BANK_NAME_FORBIDDEN = set('/\\:*?"<>|')  # folders, and characters Windows refuses in names
MAX_BANK_NAME_BYTES = 200  # leaves room for '_00001.safetensors.tmp' under the usual 255-byte limit


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
    pattern = LAYER_PATTERNS[family]
    for name in layers:
        match = re.fullmatch(pattern, name) if isinstance(name, str) else None
        if not match or int(match.group(1)) >= depth:
            raise _refusal(path, "layers", f"a list of {family} attention layer names like "
                           f"{LAYER_EXAMPLES[family]} with block indices below depth {depth}", name)
    if not layers or len(set(layers)) != len(layers):
        raise _refusal(path, "layers", "a non-empty list of distinct layer names", meta["layers"])
    hp = _json_field(meta, path, "hparams", dict)
    unknown = sorted(set(hp) - HPARAMS)
    if unknown:
        raise _refusal(path, "hparams", f"an object with the keys {', '.join(sorted(HPARAMS - OPTIONAL_HPARAMS))} "
                       f"and optionally {', '.join(sorted(OPTIONAL_HPARAMS))}", unknown)
    hp = dict(legacy_options(family), **hp)  # a bank from before an option: the legacy design, not DEFAULT_DESIGN
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


LAYER_SELECTION_SYNTAX = ("'all' (or blank), or comma-separated block indices and ranges such as '0-12, 20', each "
                          "optionally limited to one kind of layer with ':attn' or ':attn2' (e.g. '0-12:attn2')")
_SELECTION_ITEM = re.compile(r"([0-9]+)(?: *- *([0-9]+))?(?::(attn2?))?")  # ASCII digits only


def parse_layer_selection(selection: str) -> Optional[Tuple[Tuple[int, int, str], ...]]:
    """The (first block, last block, kind or '') items of a layer selection; None for all
    layers ('all', '' and spaces alike). Anything else is an EDiTError showing the syntax."""
    text = (selection or "").strip()
    if text.lower() in ("", "all"):
        return None
    items = []
    for part in text.split(","):
        match = _SELECTION_ITEM.fullmatch(part.strip())
        if not match:
            what = "an empty item" if not part.strip() else f"{part.strip()!r}"
            raise EDiTError(f"layer selection {selection!r}: {what} is not a block index or range; "
                            f"write {LAYER_SELECTION_SYNTAX}")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise EDiTError(f"layer selection {selection!r}: the range {part.strip()!r} runs backwards; "
                            f"write it low-high ('{last}-{first}')")
        items.append((first, last, match[3] or ""))
    return tuple(items)


def select_layers(config_layers: Sequence[str], selection: str) -> Tuple[str, ...]:
    """The bank layers a selection (see ``parse_layer_selection``) picks, in bank order."""
    items = parse_layer_selection(selection)
    if items is None:
        return tuple(config_layers)
    chosen = [name for name in config_layers
              if any(first <= int(name.split(".")[1]) <= last and (not kind or name.endswith("." + kind))
                     for first, last, kind in items)]
    if not chosen:
        raise EDiTError(f"layer selection {selection!r} selects none of the bank's layers ({', '.join(config_layers)}); "
                        "pick block indices among them, or 'all'")
    return tuple(chosen)
