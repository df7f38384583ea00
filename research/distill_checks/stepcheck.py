"""Real training steps beside the plan's fake-tensor figures: the check that the plan is right.

    python -m research.distill_checks.stepcheck --models sd35-medium pixart-sigma --resolution 1024 \\
        --device cuda --out results/

For each model and mode, the same step the plan counts (``PlanModel.step``: the
distillation's ``train_example`` under bf16 autocast, gradient clipping, AdamW) runs on real
tensors with random weights: once counted by ``PeakTensorMemory``, then timed (``--repeats``
runs, the first one warms up). On CUDA the caching allocator's peak is recorded too (what
``nvidia-smi`` users will compare with); on a CPU the process's resident memory is sampled
during the timed step. Writes stepcheck.json and stepcheck.md under ``--out``.
"""
import argparse
import json
import platform
import threading
import time
from pathlib import Path
from typing import Dict, List

import psutil
import torch

from edit_core.comfyui.env import add_comfyui_flag, setup_comfy
from edit_core.distill.plan import PlanModel, gib, measure
from edit_core.util.cli import size_of

MODES = ("layerwise", "e2e")
SMOKE_MODELS = ("sd35-medium-2blocks", "pixart-sigma-2blocks")


def smoke_unet_config(name: str) -> dict:
    """Real width, 2 blocks: the CPU smoke run of the GPU check (SD3's depth sets its width, so
    the block count is MMDiT's own ``num_blocks``; a 64 x 64 position table, not 384 x 384)."""
    from edit_core.comfyui.architectures import PIXART_SIGMA, SD35_MEDIUM
    if name == "sd35-medium-2blocks":
        return dict(SD35_MEDIUM, num_blocks=2, x_block_self_attn_layers=[0], num_patches=64 * 64, pos_embed_max_size=64)
    return dict(PIXART_SIGMA, depth=2)


class RssPeak:
    """Peak resident memory of this process above where it started, sampled every 5 ms."""

    def __init__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.start


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_model(name: str, model_config, resolution, device, dtype, repeats: int, log=print) -> List[Dict]:
    """One model: the fake plan and the real steps, row per mode."""
    fake = PlanModel(model_config, None, dtype, fake=True)
    t0 = time.perf_counter()
    real = PlanModel(model_config, None, dtype, fake=False, device=device)
    log(f"{name}: built with random weights on {device} in {time.perf_counter() - t0:.1f} s")
    rows = []
    for mode in MODES:
        predicted = measure(fake, mode, 1, resolution)
        counted = measure(real, mode, 1, resolution)
        example = real._inputs(1, resolution)
        seconds, allocator, rss = [], None, None
        for i in range(repeats):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            with RssPeak() as sampler:
                real.step([example], mode)
                _sync(device)
            seconds.append(time.perf_counter() - t0)
            if device.type == "cuda":
                allocator = torch.cuda.max_memory_allocated(device)
            else:
                rss = sampler.extra
        row = {"model": name, "mode": mode, "resolution": list(resolution), "batch": 1, "device": str(device),
               "dtype": str(dtype).replace("torch.", ""), "plan_peak_bytes": predicted.peak,
               "plan_counted_bytes": predicted.counted, "real_counted_bytes": counted.counted,
               "real_counted_peak_bytes": counted.peak, "resident_bytes": counted.resident,
               "cuda_allocator_peak_bytes": allocator, "rss_step_extra_bytes": rss,
               "step_seconds": seconds[-1], "first_step_seconds": seconds[0]}
        rows.append(row)
        log(f"{name} {mode}: plan {gib(predicted.peak)} GiB, counted on real tensors {gib(counted.peak)} GiB"
            + (f", CUDA allocator {gib(allocator)} GiB" if allocator is not None else "")
            + (f", RSS during the step +{gib(rss)} GiB (counted +{gib(counted.counted)})" if rss is not None else "")
            + f", step {seconds[-1]:.2f} s")
    del real
    return rows


def markdown(rows: List[Dict], title: str) -> str:
    lines = [f"# {title}", "", "| model | mode | resolution | plan (fake tensors) | counted on real tensors | "
             "CUDA allocator peak | RSS during step | step time |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        alloc = "-" if r["cuda_allocator_peak_bytes"] is None else f"{gib(r['cuda_allocator_peak_bytes'])} GiB"
        rss = "-" if r["rss_step_extra_bytes"] is None else (
            f"+{gib(r['rss_step_extra_bytes'])} GiB (counted +{gib(r['real_counted_bytes'])})")
        w, h = r["resolution"]
        lines.append(f"| {r['model']} | {r['mode']} | {w}x{h} | {gib(r['plan_peak_bytes'])} GiB | "
                     f"{gib(r['real_counted_peak_bytes'])} GiB | {alloc} | {rss} | {r['step_seconds']:.2f} s |")
    lines += ["", "Peaks are totals: weights + bank + AdamW state + the step's own tensors, batch 1. "
              "RSS: the process's resident memory above its level before the step (CPU only)."]
    return "\n".join(lines) + "\n"


def run(models, resolution, device, dtype, repeats, out: Path, title: str, log=print) -> List[Dict]:
    from edit_core.comfyui.architectures import model_config_for, model_config_from_unet_config
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in models:
        config = (model_config_from_unet_config(smoke_unet_config(name), name) if name in SMOKE_MODELS
                  else model_config_for(name))
        rows += check_model(name, config, resolution, device, dtype, repeats, log)
        (out / "stepcheck.json").write_text(json.dumps({
            "title": title, "torch": torch.__version__, "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "rows": rows}, indent=1))
        (out / "stepcheck.md").write_text(markdown(rows, title))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.distill_checks.stepcheck", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    h = " (default: %(default)s)"
    p.add_argument("--models", nargs="+", default=["sd35-medium", "pixart-sigma"],
                   help="sd35-medium, pixart-sigma, checkpoint files (only their headers are read), or the CPU smoke "
                        f"test's {', '.join(SMOKE_MODELS)}" + h)
    p.add_argument("--resolution", default="1024", help="WIDTH or WIDTHxHEIGHT in px" + h)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help=h.strip())
    p.add_argument("--repeats", type=int, default=2, help="timed steps per mode; the last one is reported" + h)
    p.add_argument("--out", default="stepcheck", help="folder for stepcheck.json and stepcheck.md" + h)
    add_comfyui_flag(p)
    args = p.parse_args(argv)
    setup_comfy(args.comfyui)
    resolution = size_of(args.resolution)
    device = torch.device(args.device)
    run(args.models, resolution, device, torch.bfloat16, max(1, args.repeats), Path(args.out),
        f"Training steps at {args.resolution} px on {device}: real run beside the plan")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
