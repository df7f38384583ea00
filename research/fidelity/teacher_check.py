"""Can the teacher draw? Every held-out caption (never seen in training) is sampled by the
teacher; the study's classifier names each sample's category, and its accuracy on them is
compared with its accuracy on the real held-out images of the same captions. A teacher that
draws the captioned emoji scores close to the real images; one that draws colour noise scores
near chance. The grid shows real images beside teacher samples of several seeds."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from PIL import Image

from edit_core.distill.trajectories import sample
from edit_core.util.plots import image_grid
from .emoji import EmojiSet, to_unit
from .features import Classifier, labels_of
from .report import loss_chart, picture, save
from .study import StudySettings
from .teacher import Teacher


@dataclass(frozen=True)
class CheckSettings:
    """How the teacher samples: as the study samples it (Euler, its steps and CFG), at 64 px."""
    px: int = 64
    steps: int = StudySettings.sample_steps
    cfg: float = StudySettings.cfg
    sampler: str = "euler"
    scheduler: str = "simple"
    grid_seeds: Sequence[int] = (0, 1, 2)
    grid_rows: int = 12


QUICK = CheckSettings(steps=2, grid_seeds=(0, 1), grid_rows=2)


def teacher_samples(teacher: Teacher, captions: Sequence[str], seed: int, settings: CheckSettings) -> torch.Tensor:
    """(N, 4, px, px) [-1, 1] RGBA: one sample per caption, noise seed ``seed * 100003 + i``."""
    w, h = teacher.resolution(settings.px)
    negative = teacher.conditioning("")
    latents = [sample(teacher.patcher, teacher.conditioning(c), negative, w, h, seed * 100003 + i, settings.sampler,
                      settings.scheduler, settings.steps, settings.cfg) for i, c in enumerate(captions)]
    return teacher.images(torch.cat(latents)).clamp(-1, 1)


def check_teacher(teacher: Teacher, data: EmojiSet, classifier: Classifier, settings: CheckSettings = CheckSettings(),
                  limit: int = 0) -> Dict:
    """Classifier accuracy on the real held-out images and on the teacher's samples of their
    captions, seed 0 (``limit`` > 0: that many captions, taking the categories in turn); with
    the samples."""
    held = data.split(held_out=True)
    idx = rows_across_categories(held.categories, limit) if limit else list(range(len(held)))
    labels = labels_of(held, classifier.classes)[idx]
    real = to_unit(held.images[idx], settings.px)
    captions = [held.captions[i] for i in idx]
    samples = teacher_samples(teacher, captions, 0, settings)
    real_accuracy = float((classifier.predict(real) == labels).float().mean())
    teacher_accuracy = float((classifier.predict(samples) == labels).float().mean())
    return {"family": teacher.family, "captions": captions, "categories": [held.categories[i] for i in idx],
            "real_accuracy": real_accuracy, "teacher_accuracy": teacher_accuracy,
            "ratio": teacher_accuracy / real_accuracy if real_accuracy else 0.0, "chance": classifier.chance,
            "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
            "real": real, "samples": samples}


def rows_across_categories(categories: Sequence[str], n: int) -> List[int]:
    """``n`` indices taking the categories in turn, so the grid shows all of them."""
    order: Dict[str, List[int]] = {}
    for i, c in enumerate(categories):
        order.setdefault(c, []).append(i)
    picked, depth = [], 0
    while len(picked) < n and any(depth < len(v) for v in order.values()):
        picked += [v[depth] for v in order.values() if depth < len(v)][:n - len(picked)]
        depth += 1
    return picked


def check_grid(teacher: Teacher, result: Dict, settings: CheckSettings = CheckSettings()) -> Image.Image:
    """Real held-out emoji | the teacher's samples of the same caption, one column per seed
    (seed 0 is the sample the accuracy counted), rows taking the categories in turn."""
    idx = rows_across_categories(result["categories"], settings.grid_rows)
    captions = [result["captions"][i] for i in idx]
    columns = [result["real"][idx]]
    for seed in settings.grid_seeds:
        columns.append(result["samples"][idx] if seed == 0 else teacher_samples(teacher, captions, seed, settings))
    cells = [[picture(c[r]) for c in columns] for r in range(len(idx))]
    labels = [c.split(",")[0][:18] for c in captions]
    return image_grid(cells, labels, ["real"] + [f"teacher, seed {s}" for s in settings.grid_seeds])


def summary_line(result: Dict) -> str:
    return (f"{result['family']}: classifier accuracy on {len(result['captions'])} held-out captions, real "
            f"{result['real_accuracy']:.1%}, teacher samples {result['teacher_accuracy']:.1%} "
            f"({result['ratio']:.0%} of real; chance {result['chance']:.1%})")


def write_checks(out, teachers: Dict[str, Teacher], results: Dict[str, Dict], grids: Dict[str, Image.Image]) -> Path:
    """teachers.json (accuracies, settings, training time), <family>_teacher_<px>px.png and
    teacher_loss.png in ``out``."""
    out = Path(out)
    for family, grid in grids.items():
        save(grid, out / f"{family}_teacher_{results[family]['settings']['px']}px.png")
    save(loss_chart({f: t.history for f, t in teachers.items()}), out / "teacher_loss.png")
    record = {f: {k: v for k, v in r.items() if k not in ("real", "samples", "captions", "categories")}
              | {"seconds": teachers[f].seconds, "config": teachers[f].config.__dict__, "held_out": len(r["captions"])}
              for f, r in results.items()}
    path = out / "teachers.json"
    path.write_text(json.dumps(record, indent=1, default=list))
    return path
