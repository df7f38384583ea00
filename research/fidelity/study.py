"""The fidelity study: EDiT students distilled from the emoji teachers, one per student design
(the ablations), judged on held-out captions and seeds at two resolutions.

For every family and ablation: the student's bank is distilled with the product's own
``distill`` (layer-wise then end-to-end, progressive over both resolutions), then every
held-out caption is sampled by teacher and student from the same noise. Measured:

- final-image error: relative L2 of the student's sampled image against the teacher's;
- per-layer feature error after training (``distill``'s own held-in measure);
- Frechet distance, in the features of a classifier trained here on the same images,
  between student and teacher samples, and against the real held-out images (the
  teacher-vs-real distance is the floor a student is compared with).
"""
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, median
from typing import Dict, List, Sequence, Tuple

import torch

from edit_core.bank import DEFAULT_DESIGN, ORIGINAL_HPARAMS, init_bank
from edit_core.comfyui.model import model_spec
from edit_core.comfyui.patcher import apply_edit
from edit_core.distill.config import DistillConfig
from edit_core.distill.train import distill
from edit_core.distill.trajectories import sample
from ..bench.cases import Case, Point
from ..bench.grid import default_device
from ..bench.timing import measure
from ..distill_checks.evaluate import relative_l2
from .emoji import EmojiSet, to_unit
from .teacher import Teacher

# The design every ablation changes one thing of: the shipped default before this study
# (k/v compressed by a 3 x 3 stride-2 window): today's default with BankConfig's own values
# for what the study changed (DEFAULT_DESIGN).
BASE = {key: ORIGINAL_HPARAMS[key] for key in DEFAULT_DESIGN}
# name: (what it changes, bank hyper-parameters, families it means something for)
ABLATIONS = {
    "a": ("previous default (k/v compressed)", {}, ("sd3", "pixart")),
    "b": ("no local branch", {"local_kernel": 0}, ("sd3", "pixart")),
    "c": ("no ConvFusion", {"cf_kernel": 0}, ("sd3", "pixart")),
    "d": ("compressor off (k=1, stride 1)", {"sc_kernel": 1, "sc_stride": 1}, ("sd3", "pixart")),
    "e": ("ConvFusion reads the modulated input", {"cf_input": "modulated"}, ("sd3",)),  # PixArt's always does
    "f": ("LoRA q/k/v update, rank 8", {"qkv_rank": 8}, ("sd3", "pixart")),
    "g": ("local branch outside eta", {"local_placement": "outside"}, ("sd3",)),       # PixArt has no eta
    # The two designs that beat (a) on PixArt's first run, together.
    "h": ("compressor off + LoRA q/k/v rank 8", {"sc_kernel": 1, "sc_stride": 1, "qkv_rank": 8}, ("sd3", "pixart")),
}


def design(name: str) -> dict:
    """The bank hyper-parameters of ablation ``name``: BASE with its one change."""
    return dict(BASE, **ABLATIONS[name][1])


# The ablation that is the shipped default: the equal-speed baselines run at its speed-up.
DEFAULT_ABLATION = next(n for n in ABLATIONS if design(n) == dict(BASE, **DEFAULT_DESIGN))


@dataclass(frozen=True)
class StudySettings:
    image_px: Tuple[int, ...] = (40, 64)  # 20 x 20 and 32 x 32 tokens: the teachers' two training sizes
    train_prompts: int = 24
    seeds: Tuple[int, ...] = (0, 1)
    held_out: int = 32
    sample_steps: int = 10
    cfg: float = 3.0
    train_steps: int = 600
    batch_size: int = 2
    lr: float = 1e-2


QUICK = StudySettings(image_px=(40, 64), train_prompts=2, seeds=(0,), held_out=3, sample_steps=2, train_steps=4,
                      batch_size=1)


def pick(captions: Sequence[str], n: int) -> List[int]:
    """n indices spread evenly over ``captions`` (catalogue order groups categories)."""
    n = min(n, len(captions))
    return [round(i * (len(captions) - 1) / max(n - 1, 1)) for i in range(n)]


class Samples:
    """Teacher or student samples of the held-out captions at each resolution, as [-1, 1] RGBA."""

    def __init__(self, teacher: Teacher, model, captions: List[str], settings: StudySettings):
        self.images: Dict[int, torch.Tensor] = {}
        negative = teacher.conditioning("")
        for px in settings.image_px:
            w, h = teacher.resolution(px)
            latents = [sample(model, teacher.conditioning(c), negative, w, h, 1000 + i, "euler", "simple",
                              settings.sample_steps, settings.cfg) for i, c in enumerate(captions)]
            self.images[px] = teacher.images(torch.cat(latents)).clamp(-1, 1)


def image_errors(student: Samples, teacher: Samples) -> Dict[int, float]:
    return {px: mean(relative_l2(s, t) for s, t in zip(student.images[px], teacher.images[px]))
            for px in teacher.images}


def run_family(teacher: Teacher, data: EmojiSet, classifier, frechet, settings: StudySettings,
               ablations: Sequence[str], work: Path, log=print, speedup: float = 0.0) -> Dict:
    """Distil and measure every ablation for one teacher; with ``speedup`` (the default
    design's measured one), also the equal-speed baselines (baselines.py). Returns the records."""
    family, model = teacher.family, teacher.patcher
    train, held = data.split(held_out=False), data.split(held_out=True)
    prompts = [teacher.conditioning(train.captions[i]) for i in pick(train.captions, settings.train_prompts)]
    held_idx = pick(held.captions, settings.held_out)
    captions = [held.captions[i] for i in held_idx]
    real = {px: to_unit(held.images[held_idx], px) for px in settings.image_px}
    feats = lambda images: classifier.features(images)  # noqa: E731
    t0 = time.perf_counter()
    teacher_samples = Samples(teacher, model, captions, settings)
    log(f"{family}: teacher samples in {time.perf_counter() - t0:.0f} s")
    teacher_feats = {px: feats(x) for px, x in teacher_samples.images.items()}
    real_feats = {px: feats(x) for px, x in real.items()}
    records = {"teacher": {"fd_teacher_real": {px: frechet(teacher_feats[px], real_feats[px]) for px in real},
                           "captions": captions}, "ablations": {}}
    # The teacher's own sensitivity, a scale for the image errors below: its samples in bfloat16
    # and with one sampling step fewer, against its float32 samples of the same noise.
    fewer = dataclasses.replace(settings, sample_steps=max(1, settings.sample_steps - 1))
    records["teacher"]["sensitivity"] = {
        "bfloat16": image_errors(Samples(teacher, teacher.patcher_in(torch.bfloat16), captions, settings), teacher_samples),
        "one step fewer": image_errors(Samples(teacher, model, captions, fewer), teacher_samples)}
    resolutions = tuple(teacher.resolution(px) for px in settings.image_px)
    config = DistillConfig(resolutions=resolutions, seeds=settings.seeds, sample_steps=settings.sample_steps,
                           cfg=settings.cfg, train_steps=settings.train_steps, batch_size=settings.batch_size,
                           lr=settings.lr, warmup_steps=10, mode="layerwise+e2e", checkpoint_every=10 ** 9)
    spec = model_spec(model)
    untrained = Samples(teacher, apply_edit(model, init_bank(spec, **BASE)), captions, settings)
    records["untrained"] = {"image_error": image_errors(untrained, teacher_samples)}
    for name in ablations:
        title, hparams, families = ABLATIONS[name]
        if family not in families:
            continue
        t0 = time.perf_counter()
        result = distill(model, prompts, teacher.conditioning(""), config, work / family, bank=init_bank(spec, **design(name)))
        seconds = time.perf_counter() - t0
        student = Samples(teacher, apply_edit(model, result.bank), captions, settings)
        student_feats = {px: feats(x) for px, x in student.images.items()}
        records["ablations"][name] = {
            "title": title, "hparams": hparams, "seconds": seconds,
            "bank_parameters": sum(t.numel() for t in result.bank.tensors().values()),
            "image_error": image_errors(student, teacher_samples),
            "fd_student_teacher": {px: frechet(student_feats[px], teacher_feats[px]) for px in real},
            "fd_student_real": {px: frechet(student_feats[px], real_feats[px]) for px in real},
            "layer_errors_before": result.layer_errors_before, "layer_errors_after": result.layer_errors_after,
            "history": result.history,
        }
        r = records["ablations"][name]
        log(f"{family} ({name}) {title}: image error " + ", ".join(f"{px} px {e:.4f}" for px, e in r["image_error"].items())
            + " | FD to teacher " + ", ".join(f"{px} px {e:.3f}" for px, e in r["fd_student_teacher"].items())
            + f" | {seconds:.0f} s")
        records["ablations"][name]["samples"] = {px: x[:8] for px, x in student.images.items()}
    if speedup:
        from .baselines import fewer_steps, lazycache
        records["baselines"] = {}
        for name, make in (("fewer_steps", fewer_steps), ("lazycache", lazycache)):
            t0 = time.perf_counter()
            r = make(teacher, captions, settings, speedup)
            samples = r.pop("samples")
            b_feats = {px: feats(x) for px, x in samples.images.items()}
            r |= {"image_error": image_errors(samples, teacher_samples),
                  "fd_student_teacher": {px: frechet(b_feats[px], teacher_feats[px]) for px in real},
                  "fd_student_real": {px: frechet(b_feats[px], real_feats[px]) for px in real},
                  "seconds": time.perf_counter() - t0, "samples": {px: x[:8] for px, x in samples.images.items()}}
            records["baselines"][name] = r
            log(f"{family} baseline {r['title']} ({r['speedup']:.2f}x): image error "
                + ", ".join(f"{px} px {e:.4f}" for px, e in r["image_error"].items())
                + " | FD to teacher " + ", ".join(f"{px} px {e:.3f}" for px, e in r["fd_student_teacher"].items()))
        records["baselines_speedup"] = speedup
    records["teacher"]["samples"] = {px: x[:8] for px, x in teacher_samples.images.items()}
    records["teacher"]["real"] = {px: x[:8] for px, x in real.items()}
    return records


def block_speedups(family: str, designs: Dict[str, Dict], px: int = 2048, prompt: int = 154, repeats: int = 2,
                   log=print) -> Dict[str, float]:
    """Original block time / EDiT block time for each design's bank, at the family's real width
    (SD3.5-Medium's MMDiT-X block, PixArt-Sigma's block; random weights), measured with
    research.bench's block level. The original block is timed once, every design's EDiT
    block in the same process right after: on a CPU other work in between skews the ratios."""
    name = "sd35" if family == "sd3" else "pixart"
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    point = Point(name, "block", px, 1, prompt)
    baseline, out = None, {}
    for label, hparams in designs.items():
        case = Case(name, "block", dtype, device, bank_hparams=hparams)
        variants, _ = case.variants(point)
        wanted = {"edit": variants["edit"]} if baseline else {"baseline": variants["baseline"], "edit": variants["edit"]}
        meas = measure(wanted, device, repeats=repeats, warmup=1, budget=120.0)
        if baseline is None:
            baseline = median(meas["baseline"].times)
        out[label] = baseline / median(meas["edit"].times)
        log(f"{family} ({label}) block at {px} px: EDiT/original speed {out[label]:.2f}x")
        case.close()
        del case, variants
    return out


def write_json(records: Dict, path: Path):
    """The records without image tensors, as JSON."""
    def strip(obj):
        if isinstance(obj, dict):
            return {str(k): strip(v) for k, v in obj.items() if k != "samples" and k != "real"}
        if isinstance(obj, (list, tuple)):
            return [strip(v) for v in obj]
        return obj
    path.write_text(json.dumps(strip(records), indent=1))

