"""What a bank is made of: the hyper-parameters with their rules and defaults, ``ModelSpec``
(what a bank must match in a model) and ``BankConfig`` (a bank's model, layers and
hyper-parameters). No tensors here; the families' facts are in families.py."""
from dataclasses import dataclass, field, fields
from typing import Dict, Optional, Tuple

from ..attention.layers import DEFAULT_REDUCTION, LOCAL_PLACEMENTS
from .families import BANK_FAMILIES

FAMILIES = tuple(BANK_FAMILIES)
MAX_KERNEL = 15
MAX_REDUCTION = 1024
MAX_QKV_RANK = 256
ETA_MODES = ("learned", "ratio")
CF_INPUTS = ("residual", "modulated")
# What ConvFusion reads where a bank does not say, by family.
DEFAULT_CF_INPUT = {name: family.cf_inputs[0] for name, family in BANK_FAMILIES.items()}
# The other student-design options as the banks written before they existed have them (the
# BankConfig field defaults too): a file's hparams that lack one load as this.
OPTION_DEFAULTS = {"sc_stride": 2, "qkv_rank": 0, "local_placement": "inside"}
# The student design a new bank gets where no option says otherwise (init_bank, and through it
# the nodes, the distill CLI, the tiny models and the benchmarks): the design the fidelity study
# picked (docs/fidelity.md, design d): no k/v compression. The one place to switch the default;
# the other hyper-parameters keep their BankConfig field defaults.
DEFAULT_DESIGN = {"sc_kernel": 1, "sc_stride": 1}


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


@dataclass(frozen=True)
class BankConfig:
    """A bank's model, layers and hyper-parameters. The field defaults are the original design
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

    def hparams(self) -> Dict:
        """The hyper-parameters a bank file stores. Optional options at their original values
        are left out: an original-design bank's file (and the fingerprints of its runs) stay
        as before, and a file without them loads as that design."""
        base = {"reduction": self.reduction, "cf_kernel": self.cf_kernel, "sc_kernel": self.sc_kernel,
                "local_kernel": self.local_kernel, "eta_mode": self.eta_mode}
        return dict(base, **{k: getattr(self, k) for k, default in original_options(self.family).items()
                             if getattr(self, k) != default})

    def describe(self) -> str:
        return (f"{self.family}, hidden {self.hidden_size}, {self.heads} heads, depth {self.depth}, "
                f"{len(self.layers)} layers")


def original_options(family: str) -> Dict:
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
# The original design: the BankConfig field defaults (cf_input None: the family's DEFAULT_CF_INPUT).
ORIGINAL_HPARAMS = {f.name: f.default for f in fields(BankConfig) if f.name in HPARAMS}


def default_hparam(key: str):
    """What a new bank gets for hyper-parameter ``key`` when no option says: DEFAULT_DESIGN's
    value, else the original one. The defaults the node widgets and the CLI flags show."""
    return DEFAULT_DESIGN.get(key, ORIGINAL_HPARAMS[key])


def hparam_problem(key: str, value) -> Optional[str]:
    """None if ``value`` is a valid ``key`` hyper-parameter, else what it must be."""
    expected, ok = HPARAM_RULES[key]
    kind = str if key in TEXT_HPARAMS else int
    return None if type(value) is kind and ok(value) else expected  # type(): a JSON true is no number


def family_hparam_problem(family: str, key: str, value) -> Optional[str]:
    """None if a valid hyper-parameter fits the family, else what it must be there."""
    allowed = BANK_FAMILIES[family].cf_inputs
    if key == "cf_input" and value not in allowed:
        return f"{' or '.join(repr(v) for v in allowed)} for {family} ({BANK_FAMILIES[family].cf_input_reason})"
    return None
