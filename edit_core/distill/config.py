"""Distillation settings and the plan of training phases they imply."""
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import List, Tuple

from ..bank import EDiTError

MODES = ("layerwise+e2e", "layerwise", "e2e")


@dataclass(frozen=True)
class Phase:
    resolution: Tuple[int, int]  # (width, height) in pixels
    mode: str                    # "layerwise" or "e2e"
    start: int                   # first global step
    steps: int


@dataclass(frozen=True)
class DistillConfig:
    """Everything that determines a distillation's result (besides model, bank and prompts).

    Data: one teacher image for every prompt x seed x resolution, sampled with
    sampler/scheduler/sample_steps/cfg. Training: ``train_steps`` optimiser steps of
    ``batch_size`` examples each, split evenly over the resolutions (ascending:
    progressive resolution), and within each resolution into layer-wise then end-to-end
    steps by ``layerwise_fraction`` when mode is "layerwise+e2e". ``layers_per_step``: train
    a random subset of that many layers per step (0: all).
    """
    resolutions: Tuple[Tuple[int, int], ...] = ((512, 512),)
    seeds: Tuple[int, ...] = (0,)
    sampler: str = "euler"
    scheduler: str = "simple"
    sample_steps: int = 20
    cfg: float = 4.0
    train_steps: int = 500
    batch_size: int = 2
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mode: str = "layerwise+e2e"
    layerwise_fraction: float = 0.5
    feature_weight: float = 1.0
    output_weight: float = 1.0
    task_weight: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50
    layers_per_step: int = 0

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


def _items(text) -> List[str]:
    """'0,1 2' or ['0', '1,2'] -> ['0', '1', '2']: comma and space separated lists alike."""
    parts = text if isinstance(text, (list, tuple)) else [text]
    return [p for part in parts for p in str(part).replace(",", " ").split()]


def parse_resolutions(text) -> Tuple[Tuple[int, int], ...]:
    """'512,1024', '512 1024' or '768x512, 1024' -> ((512, 512), (1024, 1024)) / ((768, 512), (1024, 1024))."""
    out = []
    for part in _items(text):
        w, _, h = part.strip().lower().partition("x")
        try:
            out.append((int(w), int(h or w)))
        except ValueError:
            raise EDiTError(f"resolutions {text!r}: {part.strip()!r} is not a size like 512 or 768x512")
    return tuple(out)


def parse_ints(text) -> Tuple[int, ...]:
    """'0,1,2', '0 1 2' -> (0, 1, 2)."""
    try:
        return tuple(int(p) for p in _items(text))
    except ValueError:
        raise EDiTError(f"{text!r} is not a list of whole numbers (e.g. 0,1,2 or 0 1 2)")


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
