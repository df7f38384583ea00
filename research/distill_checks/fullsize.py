"""Benchmark (not a test): the real SD3.5-Medium and PixArt-Sigma at full depth and width,
random weights, on this machine's CPU: teacher data, two training steps of each mode, a
saved bank, with wall times and peak memory beside the plan's fake-tensor figures.

    python -m research.distill_checks.fullsize --out docs/distill-memory

The pieces are the distillation's own: ``trajectories.generate`` writes the teacher data
(final latent, sigmas, conditioning), ``examples.make_example`` re-noises it, and each step
is ``losses.train_example`` + clipping + AdamW (``PlanModel.step``, the step the plan
counts). Left out: the before/after layer-error evaluation ``distill`` runs on 8 examples
(16 teacher passes; it is no part of a training step's memory). The conditioning is seeded
random features in place of text encoders. Each step is counted by ``PeakTensorMemory`` on
its real tensors and watched through the process's resident memory.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from edit_core.bank import save_bank
from edit_core.comfyui.env import add_comfyui_flag, setup_comfy
from edit_core.distill.config import DistillConfig
from edit_core.distill.plan import PlanModel, gib, measure
from edit_core.distill.teacher_data import TeacherData, image_jobs
from edit_core.util.memory import PeakTensorMemory
from .stepcheck import RssPeak

# ComfyUI's PixArt cannot run below 384 px square: its position embedding divides by
# round(latent side / 64), which is 0 at 256 px.
RESOLUTIONS = {"sd35-medium": (256, 256), "pixart-sigma": (384, 384)}
STEPS = ("layerwise", "layerwise", "e2e", "e2e")


def run_model(name: str, resolution, sample_steps: int, out: Path, log=print) -> Dict:
    import comfy.model_management
    from edit_core.comfyui.model import conditioning_dims
    from edit_core.comfyui.architectures import PROMPT_TOKENS, model_config_for
    from edit_core.fixtures.tiny_models import random_conditioning
    from edit_core.distill.examples import make_example
    from edit_core.distill.trajectories import generate

    config = model_config_for(name)
    t0 = time.perf_counter()
    model = PlanModel(config, None, torch.bfloat16, fake=False)
    fake = PlanModel(config, None, torch.bfloat16, fake=True)
    seconds_build = time.perf_counter() - t0
    log(f"{name}: built with random weights in {seconds_build:.1f} s ({model.describe()})")

    context_dim, pooled_dim = conditioning_dims(model.trainer)
    tokens = PROMPT_TOKENS[model.spec.family]
    positive = [random_conditioning("a lighthouse on a cliff at dusk", 0, tokens, context_dim, pooled_dim)]
    negative = random_conditioning("", 0, tokens, context_dim, pooled_dim)
    dconfig = DistillConfig(resolutions=(tuple(resolution),), seeds=(0,), sample_steps=sample_steps, train_steps=4,
                            batch_size=1)
    data = TeacherData(out / f"teacher-{name}")
    jobs = image_jobs(dconfig.resolutions, 1, dconfig.seeds)
    t0 = time.perf_counter()
    with RssPeak() as teacher_rss:
        generate(model.trainer, positive, negative, jobs, data, dconfig)
    seconds_teacher = time.perf_counter() - t0
    log(f"{name}: teacher data ({sample_steps} sampler steps, CFG) in {seconds_teacher:.1f} s, "
        f"{data.bytes_on_disk() / 2 ** 20:.2f} MiB on disk")

    comfy.model_management.load_models_gpu([model.trainer], force_full_load=True)
    steps: List[Dict] = []
    for step, mode in enumerate(STEPS):
        example = make_example(model.trainer, data, jobs[0], 0, step, 0, "cpu", torch.bfloat16)
        t0 = time.perf_counter()
        with RssPeak() as rss, PeakTensorMemory() as counter:
            parts = model.step([(example.x, example.t, example.conds)], mode)
        seconds = time.perf_counter() - t0
        plan = measure(fake, mode, 1, tuple(resolution))
        steps.append({"step": step + 1, "mode": mode, "seconds": seconds, "loss": parts["loss"],
                      "counted_peak_bytes": model.weights + model.bank_bytes + model.optimizer_bytes + counter.peak,
                      "counted_bytes": counter.peak, "rss_extra_bytes": rss.extra, "plan_peak_bytes": plan.peak,
                      "plan_counted_bytes": plan.counted})
        log(f"{name} step {step + 1} {mode}: {seconds:.1f} s, loss {parts['loss']:.4f}, counted +{gib(counter.peak)} "
            f"GiB (plan +{gib(plan.counted)}), RSS +{gib(rss.extra)} GiB")
    bank_path = out / f"{name}_edit_256px_4steps.safetensors"
    model.bank.requires_grad_(False)
    save_bank(model.bank, bank_path)
    return {"model": name, "resolution": list(resolution), "sample_steps": sample_steps,
            "seconds_build": seconds_build, "seconds_teacher": seconds_teacher,
            "teacher_bytes": data.bytes_on_disk(), "teacher_rss_extra_bytes": teacher_rss.extra, "weights_bytes": model.weights, "bank_bytes": model.bank_bytes,
            "optimizer_bytes": model.optimizer_bytes, "steps": steps, "bank": bank_path.name,
            "bank_file_bytes": bank_path.stat().st_size, "threads": torch.get_num_threads()}


def markdown(results: List[Dict]) -> str:
    lines = ["| model | resolution | step | mode | wall time | counted peak (real tensors) | plan (fake tensors) | "
             "RSS during step |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        w, h = r["resolution"]
        for s in r["steps"]:
            lines.append(f"| {r['model']} | {w}x{h} | {s['step']} | {s['mode']} | {s['seconds']:.1f} s | "
                         f"{gib(s['counted_peak_bytes'])} GiB (+{gib(s['counted_bytes'])}) | "
                         f"{gib(s['plan_peak_bytes'])} GiB (+{gib(s['plan_counted_bytes'])}) | +{gib(s['rss_extra_bytes'])} GiB |")
    lines.append("")
    for r in results:
        total = r["seconds_teacher"] + sum(s["seconds"] for s in r["steps"])
        lines.append(f"- {r['model']}: build {r['seconds_build']:.0f} s, teacher data {r['seconds_teacher']:.0f} s "
                     f"({r['sample_steps']} sampler steps with CFG, {r['teacher_bytes'] / 2 ** 20:.2f} MiB), "
                     f"4 training steps {sum(s['seconds'] for s in r['steps']):.0f} s; teacher data to saved bank "
                     f"{total:.0f} s on {r['threads']} threads; bank file {r['bank_file_bytes'] / 2 ** 20:.1f} MiB")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.distill_checks.fullsize", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    h = " (default: %(default)s)"
    p.add_argument("--models", nargs="+", default=list(RESOLUTIONS), choices=list(RESOLUTIONS), help=h.strip())
    p.add_argument("--sample-steps", type=int, default=2, help="teacher sampler steps per image" + h)
    p.add_argument("--out", default="docs/distill-memory", help="folder for fullsize.json / fullsize.md" + h)
    p.add_argument("--work", help="folder for the teacher data and the banks (default: a new temporary folder)")
    add_comfyui_flag(p)
    args = p.parse_args(argv)
    setup_comfy(args.comfyui)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="edit-fullsize-"))
    results = []
    for name in args.models:
        results.append(run_model(name, RESOLUTIONS[name], args.sample_steps, work))
        (out / "fullsize.json").write_text(json.dumps(results, indent=1))
        (out / "fullsize.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
