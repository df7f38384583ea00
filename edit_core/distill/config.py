"""Distillation settings and the plan of training phases they imply."""
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import List, Tuple

from ..errors import EDiTError
from ..util.cli import list_items, size_of
from ..util.settings import setting_field, settings_of

MODES = ("layerwise+e2e", "layerwise", "e2e")


@dataclass(frozen=True)
class Phase:
    resolution: Tuple[int, int]  # (width, height) in pixels
    mode: str                    # "layerwise" or "e2e"
    start: int                   # first global step
    steps: int


def parse_resolutions(text) -> Tuple[Tuple[int, int], ...]:
    """'512,1024', '512 1024' or '768x512, 1024' -> ((512, 512), (1024, 1024)) / ((768, 512), (1024, 1024))."""
    out = []
    for part in list_items(text):
        try:
            out.append(size_of(part))
        except ValueError:
            raise EDiTError(f"resolutions {text!r}: {part.strip()!r} is not a size like 512 or 768x512")
    return tuple(out)


def parse_ints(text) -> Tuple[int, ...]:
    """'0,1,2', '0 1 2' -> (0, 1, 2)."""
    try:
        return tuple(int(p) for p in list_items(text))
    except ValueError:
        raise EDiTError(f"{text!r} is not a list of whole numbers (e.g. 0,1,2 or 0 1 2)")



# The help groups of the command line's flags.
DATA, TRAINING = "teacher data", "training"


@dataclass(frozen=True)
class DistillConfig:
    """Everything that determines a distillation's result (besides model, bank and prompts).

    Data: one teacher image for every prompt x seed x resolution, sampled with
    sampler/scheduler/sample_steps/cfg. Training: ``train_steps`` optimiser steps of
    ``batch_size`` examples each, split evenly over the resolutions (ascending:
    progressive resolution), and within each resolution into layer-wise then end-to-end
    steps by ``layerwise_fraction`` when mode is "layerwise+e2e". ``layers_per_step``: train
    a random subset of that many layers per step (0: all).

    Each field declares its command-line flag (``cli``: the help group) and its EDiT Distill
    widget (``node``) once, here; the field order is the order of the flags and of the
    training summary stored in a bank.
    """
    resolutions: Tuple[Tuple[int, int], ...] = setting_field(
        ((512, 512),), "e.g. 512 1024, 512,1024 or 768x512", text="512", parse=parse_resolutions, cli=DATA,
        node={"tooltip": "Comma-separated, trained in ascending order: '512,1024' or '768x512'."})
    seeds: Tuple[int, ...] = setting_field(
        (0,), "noise seeds per prompt, e.g. 0 1 2 or 0,1,2", text="0", parse=parse_ints, cli=DATA,
        node={"default": "0,1", "tooltip": "Noise seeds per prompt for the teacher data."})
    sampler: str = setting_field("euler", "ComfyUI sampler name", cli=DATA, node={"name": "sampler_name"})
    scheduler: str = setting_field("simple", "ComfyUI scheduler name", cli=DATA, node={})
    sample_steps: int = setting_field(20, "sampling steps of the teacher", cli=DATA, node={"min": 1, "max": 200})
    cfg: float = setting_field(4.0, "CFG scale of the teacher", cli=DATA, node={"min": 0.0, "max": 30.0, "step": 0.1})
    train_steps: int = setting_field(500, "optimiser steps", cli=TRAINING, node={"min": 1, "max": 1000000})
    batch_size: int = setting_field(2, "examples per step (all processes together)", cli=TRAINING,
                                    node={"min": 1, "max": 256})
    lr: float = setting_field(1e-3, "peak learning rate", cli=TRAINING,
                              node={"name": "learning_rate", "min": 1e-6, "max": 1.0, "step": 0.0001})
    warmup_steps: int = setting_field(20, "linear warm-up steps", cli=TRAINING)
    weight_decay: float = setting_field(0.0, "AdamW weight decay", cli=TRAINING)
    grad_clip: float = setting_field(1.0, "gradient norm clip", cli=TRAINING)
    mode: str = setting_field("layerwise+e2e", "layer-wise, end-to-end, or layer-wise then end-to-end", choices=MODES,
                              cli=TRAINING,
                              node={"tooltip": "layer-wise (fast, low memory) then end-to-end, or either alone."})
    layerwise_fraction: float = setting_field(0.5, "share of layer-wise steps in layerwise+e2e", cli=TRAINING)
    feature_weight: float = setting_field(1.0, "weight of the per-layer feature losses", cli=TRAINING)
    output_weight: float = setting_field(1.0, "weight of the end-to-end output loss", cli=TRAINING)
    task_weight: float = setting_field(0.0, "weight of the task loss on --latents", cli=TRAINING)
    seed: int = setting_field(0, "seed of the bank's init and of the examples", cli=TRAINING,
                              node={"min": 0, "max": 0xFFFFFFFF})
    checkpoint_every: int = setting_field(50, "steps between checkpoints", cli=TRAINING)
    layers_per_step: int = setting_field(0, "train a random subset of this many layers per step (0: all; less memory "
                                         "end-to-end, less time layer-wise)", cli=TRAINING)

    def __post_init__(self):
        for name in ("cfg", "lr", "weight_decay", "grad_clip", "layerwise_fraction", "feature_weight",
                     "output_weight", "task_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise EDiTError(f"{name} must be a finite number, got {value!r}")
        if self.lr <= 0 or self.cfg < 0 or self.grad_clip <= 0:
            raise EDiTError(f"lr and grad_clip must be > 0 and cfg >= 0, got lr {self.lr}, grad_clip "
                            f"{self.grad_clip}, cfg {self.cfg}")
        if self.layers_per_step < 0 or self.checkpoint_every < 1:
            raise EDiTError(f"layers_per_step must be >= 0 and checkpoint_every >= 1, got {self.layers_per_step} "
                            f"and {self.checkpoint_every}")
        if self.mode not in MODES:
            raise EDiTError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.resolutions or any(w < 16 or h < 16 for w, h in self.resolutions):
            raise EDiTError(f"resolutions must be at least 16x16 px, got {self.resolutions}")
        if self.train_steps < len(self.resolutions):
            raise EDiTError(f"train_steps ({self.train_steps}) must be at least one per resolution "
                            f"({len(self.resolutions)})")
        if self.batch_size < 1 or self.sample_steps < 1 or not self.seeds:
            raise EDiTError("batch_size and sample_steps must be >= 1 and at least one seed is needed")
        if not 0.0 <= self.layerwise_fraction <= 1.0:
            raise EDiTError(f"layerwise_fraction must be in [0, 1], got {self.layerwise_fraction}")

    def phases(self) -> List[Phase]:
        phases, start = [], 0
        resolutions = sorted(self.resolutions, key=lambda r: (r[0] * r[1], r))
        for i, res in enumerate(resolutions):
            n = self.train_steps // len(resolutions) + (self.train_steps % len(resolutions) if i == len(resolutions) - 1 else 0)
            if self.mode == "layerwise+e2e":
                lw = round(n * self.layerwise_fraction)
                split = [("layerwise", lw), ("e2e", n - lw)]
            else:
                split = [(self.mode, n)]
            for mode, steps in split:
                if steps > 0:
                    phases.append(Phase(tuple(res), mode, start, steps))
                    start += steps
        return phases

    def data_fingerprint(self) -> str:
        """What the teacher data depends on (changing training settings reuses it)."""
        return fingerprint({k: getattr(self, k) for k in ("resolutions", "seeds", "sampler", "scheduler",
                                                          "sample_steps", "cfg")})

    def to_dict(self):
        return asdict(self)


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The settings as declared by DistillConfig's fields.
SETTINGS = settings_of(DistillConfig)
