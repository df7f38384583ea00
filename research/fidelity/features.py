"""A feature space for comparing image sets: a small classifier trained here on the emoji
images, and the Fréchet distance between two sets' features (Gaussian fit, float64).

The classifier reads [-1, 1] premultiplied RGBA (``emoji.to_unit``) at any size: 3 x 3 convs
with GroupNorm (batch-independent), two stride-2 steps and a global average pool, so 32 px and
64 px images go through the same weights; it trains on both sizes (each batch at one of them,
one in four at 64 px: it costs 4x) with small shifts and horizontal flips. Its target is the
emoji's category (10 classes), not the finer subcategory: 99 subcategories average 17 training
images each and some have one or two, too few for a held-out accuracy that means much. Its
penultimate layer (the pooled features, before the linear classifier) is the feature space.

Training is seeded and runs on one CPU thread (deterministic on a given machine); the result
is cached in a folder as safetensors (weights) + JSON (settings, data source, fingerprint,
held-out accuracy, training time), keyed by a fingerprint of the settings and the data source.
"""
import argparse
import json
import math
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from edit_core.errors import EDiTError
from edit_core.distill.config import fingerprint
from edit_core.util.safetensors_io import atomic_write, complete, save_safetensors
from . import emoji, shipped

FORMAT = "edit-emoji-classifier-1"
SHIPPED_KEY = "classifier"


@dataclass(frozen=True)
class ClassifierSettings:
    widths: Tuple[int, ...] = (24, 48, 96)   # channels per stage; the last is the feature width
    epochs: int = 12
    batch_size: int = 64
    lr: float = 6e-3
    weight_decay: float = 1e-4
    sizes: Tuple[int, ...] = (32, 32, 32, 64)  # pixel size of each batch, in turn (64 px costs 4x)
    shift: int = 3                           # random shift in pixels (at 64 px; halved at 32 px)
    flip: bool = True
    seed: int = 0

    def fingerprint(self, source: str) -> str:
        return fingerprint({"format": FORMAT, "settings": asdict(self), "source": source})


DEFAULT = ClassifierSettings()
EVAL_SIZES = (32, 48, 64)  # the study samples at 48 and 64 px; 48 px is between the trained sizes
QUICK = ClassifierSettings(widths=(16, 32, 48), epochs=3, sizes=(32,))  # tests: seconds, not a minute


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(min(8, c_out), c_out), nn.SiLU())


class EmojiClassifier(nn.Module):
    """conv stages (stride 1, 2, 2) -> global average pool (features) -> linear (class logits)."""

    def __init__(self, widths: Tuple[int, ...], classes: int):
        super().__init__()
        layers, c = [], 4
        for i, w in enumerate(widths):
            layers += [_block(c, w, 1 if i == 0 else 2), _block(w, w, 1)]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class Classifier:
    """A trained classifier with what it was trained on and how well it does."""
    model: EmojiClassifier
    classes: List[str]
    settings: ClassifierSettings
    source: str
    fingerprint: str
    held_out_accuracy: Dict[str, float]      # by size in px (EVAL_SIZES), e.g. {"32": 0.58, "48": ..., "64": ...}
    chance: float                            # held-out share of the most common category
    train_seconds: float                     # wall clock (a loaded machine stretches it)
    train_cpu_seconds: float                 # this process's CPU time while training
    history: List[float] = field(default_factory=list)  # mean training loss per epoch

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """(N, 4, S, S) [-1, 1] premultiplied RGBA, any S >= 8 -> (N, D) float64 features."""
        _check_images(images)
        return torch.cat([self.model.features(images[i:i + batch].float()).double()
                          for i in range(0, len(images), batch)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """(N,) class indices into ``classes``."""
        _check_images(images)
        return torch.cat([self.model(images[i:i + batch].float()).argmax(-1) for i in range(0, len(images), batch)])

    def metadata(self) -> dict:
        return {"format": FORMAT, "fingerprint": self.fingerprint, "source": self.source,
                "settings": asdict(self.settings), "classes": self.classes,
                "held_out_accuracy": self.held_out_accuracy, "chance": self.chance,
                "train_seconds": self.train_seconds, "train_cpu_seconds": self.train_cpu_seconds,
                "history": self.history}


def _check_images(images: torch.Tensor):
    if (not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 4
            or min(images.shape[-2:]) < 8):
        found = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise EDiTError(f"classifier input: expected (N, 4, H, W) [-1, 1] RGBA with H, W >= 8 (emoji.to_unit), "
                        f"found {found}; convert images with emoji.to_unit first")


@contextmanager
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _augment(x: torch.Tensor, shift: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Random shift (padding with transparent, -1) and horizontal flip, per image."""
    n, _, h, w = x.shape
    if shift > 0:
        padded = F.pad(x, (shift,) * 4, value=-1.0)
        dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=g)
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        mirrored = torch.rand(n, generator=g) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
    return x


def labels_of(data: emoji.EmojiSet, classes: List[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[c] for c in data.categories])


def train(data: emoji.EmojiSet, settings: ClassifierSettings = DEFAULT, progress: bool = False) -> Classifier:
    """Train on ``data``'s training split, seeded, on one CPU thread; measure on its held-out split."""
    classes = sorted(set(data.categories))
    train_set, held = data.split(False), data.split(True)
    y = labels_of(train_set, classes)
    inputs = {s: emoji.to_unit(train_set.images, s) for s in settings.sizes}
    g = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):  # seeded weight init, the caller's global RNG untouched
        torch.manual_seed(settings.seed)
        model = EmojiClassifier(settings.widths, len(classes))
    steps_per_epoch = math.ceil(len(y) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=total, pct_start=0.15)
    history = []
    bar = None
    if progress:
        bar = tqdm(total=total, desc="emoji classifier", unit="step", file=sys.stderr)
    t0, cpu0 = time.perf_counter(), time.process_time()
    with _one_thread():
        step = 0
        for _ in range(settings.epochs):
            order = torch.randperm(len(y), generator=g)
            losses = []
            for b in range(steps_per_epoch):
                idx = order[b * settings.batch_size:(b + 1) * settings.batch_size]
                size = settings.sizes[step % len(settings.sizes)]
                shift = max(1, settings.shift * size // emoji.SIZE) if settings.shift else 0
                x = _augment(inputs[size][idx], shift, settings.flip, g)
                loss = F.cross_entropy(model(x), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                step += 1
                if bar is not None:
                    bar.update()
            history.append(sum(losses) / len(losses))
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    if bar is not None:
        bar.close()
    fingerprint = settings.fingerprint(data.source)
    result = Classifier(model, classes, settings, data.source, fingerprint, {}, 0.0, seconds, cpu_seconds, history)
    y_held = labels_of(held, classes)
    with _one_thread():
        for s in EVAL_SIZES:
            result.held_out_accuracy[str(s)] = float((result.predict(emoji.to_unit(held.images, s)) == y_held)
                                                     .double().mean())
    result.chance = float(torch.bincount(y_held).max() / len(y_held))
    return result


def cache_paths(folder: Path, fingerprint: str) -> Tuple[Path, Path]:
    stem = Path(folder) / f"emoji-classifier-{fingerprint}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save(classifier: Classifier, folder: Path) -> Path:
    weights, meta = cache_paths(folder, classifier.fingerprint)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(classifier.model.state_dict(), weights, {"format": FORMAT, "fingerprint": classifier.fingerprint})
    text = json.dumps(classifier.metadata(), indent=1) + "\n"
    atomic_write(meta, lambda tmp: tmp.write_text(text))
    return weights


def load(folder: Path, settings: ClassifierSettings, source: str, shipped_key: str = "") -> Optional[Classifier]:
    """The cached classifier for these settings and data source, or None when there is none;
    EDiTError for a cached file that is damaged or is not what its name says (or, with
    ``shipped_key``, whose weights are not the ones the shipped manifest records)."""
    fingerprint = settings.fingerprint(source)
    weights, meta_path = cache_paths(folder, fingerprint)
    if not (weights.is_file() and meta_path.is_file()):
        return None
    problem = complete(weights)
    result = None
    if problem is None:
        try:
            meta = json.loads(meta_path.read_text())
            if meta["format"] != FORMAT or meta["fingerprint"] != fingerprint:
                raise ValueError(f"it is for format {meta['format']!r}, fingerprint {meta['fingerprint']!r}")
            with safe_open(str(weights), framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") != fingerprint:
                    raise ValueError("its weights carry another fingerprint")
                state = {k: f.get_tensor(k) for k in f.keys()}
            if shipped_key:
                shipped.check_digest(weights, state, shipped_key)
            model = EmojiClassifier(settings.widths, len(meta["classes"]))
            model.load_state_dict(state)
            result = Classifier(model, list(meta["classes"]), settings, source, fingerprint,
                                dict(meta["held_out_accuracy"]), float(meta["chance"]), float(meta["train_seconds"]),
                                float(meta["train_cpu_seconds"]), list(meta["history"]))
        except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
            problem = f"it does not read back ({type(e).__name__}: {e})"
    if problem is not None:
        raise EDiTError(f"cached classifier {weights} (and {meta_path.name}): {problem}; delete both files "
                        "and run again to retrain")
    return result


def load_or_train(folder: Path, settings: ClassifierSettings = DEFAULT, data: Optional[emoji.EmojiSet] = None,
                  progress: bool = False, retrain: bool = False) -> Classifier:
    """The classifier for ``settings`` on the emoji set: from ``folder`` if cached, else the
    shipped one (unless ``retrain``), else trained (2-3 minutes on one thread at DEFAULT) and
    cached there."""
    data = data if data is not None else emoji.load()
    cached = load(folder, settings, data.source)
    weights = cache_paths(shipped.FOLDER, settings.fingerprint(data.source))[0]
    if cached is None and not retrain and shipped.shipped_file(SHIPPED_KEY, weights.name):
        cached = load(shipped.FOLDER, settings, data.source, shipped_key=SHIPPED_KEY)
    if cached is not None:
        return cached
    classifier = train(data, settings, progress)
    save(classifier, folder)
    return classifier


def ship(classifier: Classifier, folder: Path):
    """Copy the cached ``classifier`` from ``folder`` into the shipped folder and record it."""
    shipped.FOLDER.mkdir(parents=True, exist_ok=True)
    for src in cache_paths(folder, classifier.fingerprint):
        shutil.copyfile(src, shipped.FOLDER / src.name)
    weights = cache_paths(shipped.FOLDER, classifier.fingerprint)[0]
    shipped.record(SHIPPED_KEY, {"file": weights.name, "weights_sha256": shipped.weights_digest(
        classifier.model.state_dict()), "command": "bash scripts/edit.sh fidelity.features --retrain",
        "train_seconds": round(classifier.train_seconds), "held_out_accuracy": classifier.held_out_accuracy})


def train_classifier(data: emoji.EmojiSet, folder: Path, quick: bool = False, progress: bool = True,
                     retrain: bool = False) -> Classifier:
    """The study's classifier: DEFAULT (QUICK with ``quick``) settings, cached in ``folder``."""
    return load_or_train(Path(folder), QUICK if quick else DEFAULT, data, progress, retrain)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    w, v = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def gaussian_frechet_distance(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor,
                              cov_b: torch.Tensor) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu_a, cov_a) and N(mu_b, cov_b):
    |mu_a - mu_b|^2 + tr(A) + tr(B) - 2 tr((A^1/2 B A^1/2)^1/2), in float64."""
    mu_a, cov_a, mu_b, cov_b = (t.double() for t in (mu_a, cov_a, mu_b, cov_b))
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between two feature sets (N_a, D) and (N_b, D), each fitted with a
    Gaussian (mean, unbiased covariance), in float64. Symmetric; 0 for identical sets."""
    for name, f in (("feats_a", feats_a), ("feats_b", feats_b)):
        if not torch.is_tensor(f) or f.ndim != 2 or f.shape[0] < 2:
            found = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
            raise EDiTError(f"frechet_distance: {name} must be (N, D) features with N >= 2, found {found}")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise EDiTError(f"frechet_distance: feature widths differ ({feats_a.shape[1]} vs {feats_b.shape[1]}); "
                        "compute both sets' features with the same classifier")
    a, b = feats_a.double(), feats_b.double()
    return gaussian_frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.fidelity.features", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Train (or load from the cache) the emoji classifier whose features "
                                            "the fidelity study's Fréchet distances use; print its accuracy.")
    p.add_argument("--cache", default="results/fidelity/work", help="folder for the cached classifier")
    p.add_argument("--quick", action="store_true", help="the small test setting instead of the default")
    p.add_argument("--retrain", action="store_true", help="train in --cache even where the pack ships the "
                   "classifier (research/fidelity/shipped): reproduces it; compare the printed digest with "
                   "manifest.json there")
    p.add_argument("--ship", action="store_true", help="copy it into research/fidelity/shipped and record it "
                   "(for the pack's maintainers)")
    args = p.parse_args(argv)
    c = train_classifier(emoji.load(), Path(args.cache), args.quick, retrain=args.retrain)
    print(f"weights sha256 {shipped.weights_digest(c.model.state_dict())}")
    if args.ship:
        ship(c, Path(args.cache))
    acc = ", ".join(f"{s} px {100 * a:.1f}%" for s, a in c.held_out_accuracy.items())
    print(f"classifier {c.fingerprint}: held-out accuracy {acc} (chance {100 * c.chance:.1f}%), "
          f"trained in {c.train_seconds:.1f} s ({c.train_cpu_seconds:.1f} s CPU) on one thread, "
          f"{len(c.classes)} categories, {c.settings.widths[-1]} features; "
          f"{cache_paths(Path(args.cache), c.fingerprint)[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
