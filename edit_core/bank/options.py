"""The options of an untrained bank (init_bank's hyper-parameters), declared once: the
command line's flags and EDiT Init From Model's widgets are made from ``SETTINGS``."""
from typing import Dict, Mapping

from ..util.settings import Setting, values_from
from . import DEFAULT_DESIGN, ORIGINAL_HPARAMS, MAX_QKV_RANK, EDiTError, default_hparam, hparam_problem
from .design import CF_INPUTS, ETA_MODES, LOCAL_PLACEMENTS, MAX_KERNEL, MAX_REDUCTION

# The help groups of the command line's flags.
MODEL, DESIGN = "model", "student design"
# cf_input's value that leaves the choice to the model's family, on the command line and the node.
FAMILY_DEFAULT = "default"
# Said by the widgets whose default is DEFAULT_DESIGN's.
DESIGN_NOTE = (" The default is the design the fidelity study picked (docs/fidelity.md); the original design: "
               + ", ".join(f"{key} {ORIGINAL_HPARAMS[key]}" for key in DEFAULT_DESIGN) + ".")
# The flags that make the original design (what a bank file without these options holds).
ORIGINAL_DESIGN_FLAGS = " ".join(f"--{key.replace('_', '-')} {ORIGINAL_HPARAMS[key]}" for key in DEFAULT_DESIGN)

SETTINGS = (
    Setting("reduction", default_hparam("reduction"), "ConvFusion reduction r of an untrained bank", int, cli=MODEL,
            node={"min": 1, "max": MAX_REDUCTION, "tooltip": "ConvFusion channel reduction r (hidden channels = "
                  "width / r). 32 keeps the branch under 4% of a block's dense compute."}),
    Setting("eta_mode", default_hparam("eta_mode"), "eta of an untrained bank", choices=ETA_MODES,
            cli=MODEL, node={"tooltip": "Hybrid attention mix: token ratio N/(N+M), with a learned per-head offset "
                             "('learned') or fixed ('ratio')."}),
    Setting("cf_kernel", default_hparam("cf_kernel"), "ConvFusion kernel size (odd); 0: no ConvFusion", int,
            cli=DESIGN, node={"min": 0, "max": MAX_KERNEL, "tooltip": "ConvFusion kernel size (odd); 0: no ConvFusion "
                              "(q~ = ReLU(q))."}),
    Setting("sc_kernel", default_hparam("sc_kernel"), "k/v compressor kernel size (odd)", int, cli=DESIGN,
            node={"min": 1, "max": MAX_KERNEL, "tooltip": "k/v compressor kernel size (odd)." + DESIGN_NOTE}),
    Setting("sc_stride", default_hparam("sc_stride"), "k/v compressor stride; 1 with --sc-kernel 1: no compression",
            int, choices=(1, 2), cli=DESIGN,
            node={"choices": None, "min": 1, "max": 2, "tooltip": "k/v compressor stride: 2 (4x fewer keys) or 1; "
                  "1 with sc_kernel 1: no compression." + DESIGN_NOTE}),
    Setting("local_kernel", default_hparam("local_kernel"), "local value branch kernel size (odd); 0: none", int,
            cli=DESIGN, node={"min": 0, "max": MAX_KERNEL, "tooltip": "Local value branch kernel size (odd); 0: no "
                              "local branch."}),
    Setting("local_placement", default_hparam("local_placement"),
            "SD3: the local branch inside the eta-weighted term or added outside it (PixArt: the same)",
            choices=LOCAL_PLACEMENTS, cli=DESIGN,
            node={"tooltip": "SD3: the local branch inside the eta-weighted term (its strength changes with "
                  "resolution) or added outside it. PixArt has no eta: both are the same."}),
    Setting("cf_input", FAMILY_DEFAULT,
            "what ConvFusion reads on SD3: the block's residual stream or the modulated attention input; default: "
            "residual on SD3, modulated on PixArt (its only choice)",
            choices=(FAMILY_DEFAULT, *CF_INPUTS), cli=DESIGN,
            node={"tooltip": "What ConvFusion reads on SD3: the block's residual stream or the modulated attention "
                  "input. default: residual on SD3, modulated on PixArt (its only choice)."}),
    Setting("qkv_rank", default_hparam("qkv_rank"),
            "rank of a low-rank update of the converted layers' normalised image q/k/v; 0: none", int, cli=DESIGN,
            node={"min": 0, "max": MAX_QKV_RANK, "tooltip": "Rank of a learned low-rank update of each converted "
                  "layer's normalised image q/k/v (read from the attention input); 0: none." + DESIGN_NOTE}),
)

# Which layers an untrained bank converts (bank/selection.py); not a hyper-parameter.
LAYERS = Setting("layers", "all", "layers of an untrained bank: 'all' or e.g. '0-12'", cli=MODEL,
                 node={"tooltip": "Which attention layers to convert: 'all' (or blank), or block indices/ranges "
                                  "such as '0-12' or '0-12:attn2' (SD3.5 MMDiT-X image attention only)."})


def options_from_flags(args) -> Dict:
    """init_bank's hyper-parameters from parsed flags (cf_input "default": left to the model's
    family); a value no bank could hold is an EDiTError, before anything loads."""
    options = values_from(SETTINGS, vars(args))
    if options["cf_input"] == FAMILY_DEFAULT:
        del options["cf_input"]
    for key, value in options.items():
        problem = hparam_problem(key, value)
        if problem:
            raise EDiTError(f"--{key.replace('_', '-')} {value}: must be {problem}")
    return options


def options_from_widgets(values: Mapping) -> Dict:
    """init_bank's hyper-parameters from the node's widgets (cf_input "default": the family's)."""
    options = values_from(SETTINGS, values, by="widget")
    if options.get("cf_input", FAMILY_DEFAULT) == FAMILY_DEFAULT:
        options["cf_input"] = None
    return options
