"""The GPU check, one run of at most about 8 minutes on one H100/H200:

1. whole model, eager: SD3.5-Medium (24 blocks) and PixArt-Sigma (28 blocks) at full depth and
   width, built through ComfyUI's classes with random weights, bf16, one diffusion-model call
   per point at 1024 / 2048 / 4096 px, batch 1 and 2 (CFG): SDPA baseline, EDiT, the bound;
2. block level, eager, the same points (comparable with the CPU tables in docs/performance.md);
3. whole model under ComfyUI's TorchCompileModel path (its ``set_torch_compile_wrapper``,
   inductor) at 2048 px batch 2, with the graph breaks Dynamo reports, recompiles, and the
   first (compiling) call's time; no compiled point starts in the last --compile-reserve s.

Stages run in that order against one time limit; a point not started in time is skipped and
listed. Each stage writes its own folder under --out, and after each stage the merged report
(results.md, results.json, PNG plots) is rewritten in --out. ``--cpu-smoke`` runs the same
stages at tiny widths and sizes on the CPU (a test of the script, not a benchmark).

    bash scripts/gpu_check.sh                 # on the GPU machine; results under $OUT
    bash scripts/gpu_check.sh --cpu-smoke     # here
"""
import argparse
import time
from pathlib import Path

import torch

from edit_core.comfyui.env import add_comfyui_flag, setup_comfy
from .grid import FAMILIES
from .options import list_option

# The CPU smoke runs on one torch thread: tiny ops on a busy machine wait on their thread pool.
# Compiled: one point per model by default. Each new shape compiles baseline, EDiT and bound again
# (inductor on a 24-block model: minutes, not measured yet), which the 8 minutes cannot hold for six.
GPU = dict(resolutions=[1024, 2048, 4096], batches=[1, 2], prompts=[154], repeats=3, warmup=2, budget=10.0,
           tiny=False, device="cuda", dtype=torch.bfloat16, depth=None, threads=None, compiled_resolutions=[2048],
           compiled_batches=[2])
CPU_SMOKE = dict(resolutions=[384, 512], batches=[1, 2], prompts=[16], repeats=1, warmup=1, budget=5.0,
                 tiny=True, device="cpu", dtype=torch.float32, depth=2, threads=1, compiled_resolutions=None,
                 compiled_batches=None)
STAGES = (("model_eager", ["model"], False), ("block_eager", ["block"], False), ("model_compiled", ["model"], True))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.bench.gpu_check", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check", help="folder for the merged report and one folder per stage")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny widths and sizes on the CPU: tests the script")
    p.add_argument("--time-limit", type=float, default=400.0,
                   help="seconds after start past which no new point starts (a started point finishes)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for stage 3 (TorchCompileModel offers inductor and cudagraphs); "
                        "unset: inductor, or with --cpu-smoke Dynamo's eager backend (graph capture and graph-break "
                        "count without code generation: inductor takes minutes per graph on 2 CPU cores)")
    list_option(p, "--families", FAMILIES, allowed=FAMILIES)
    list_option(p, "--resolutions", (), int, help="unset: 1024 2048 4096, or 384 512 with --cpu-smoke")
    list_option(p, "--batches", (), int, help="unset: 1 2")
    list_option(p, "--compiled-resolutions", (), int, help="stage 3; unset: 2048, or --resolutions with --cpu-smoke")
    list_option(p, "--compiled-batches", (), int, help="stage 3; unset: 2, or --batches with --cpu-smoke")
    p.add_argument("--compile-reserve", type=float, default=150.0,
                   help="seconds before --time-limit after which no compiled point starts (a first compiled call "
                        "can take minutes)")
    add_comfyui_flag(p)
    args = p.parse_args(argv)
    args.compile_backend = args.compile_backend or ("eager" if args.cpu_smoke else "inductor")
    grid = dict(CPU_SMOKE if args.cpu_smoke else GPU)
    grid.update({k: getattr(args, k) for k in ("resolutions", "batches", "compiled_resolutions", "compiled_batches")
                 if getattr(args, k)})
    if not args.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA device: this check is for a GPU machine; --cpu-smoke runs it at tiny size on the CPU")
    setup_comfy(args.comfyui)
    from .report import machine, merge
    from .run import run_benchmark
    start = time.time()
    out = Path(args.out)
    print("GPU check" + (" (CPU smoke: tiny widths, timings mean nothing)" if args.cpu_smoke else "") + ": "
          + "; ".join(f"{k} {v}" for k, v in machine().items()), flush=True)
    done = []
    for name, levels, compiled in STAGES:
        print(f"\n## stage {name} ({time.time() - start:.0f} s)", flush=True)
        resolutions = (compiled and grid["compiled_resolutions"]) or grid["resolutions"]
        batches = (compiled and grid["compiled_batches"]) or grid["batches"]
        deadline = start + args.time_limit - (args.compile_reserve if compiled else 0.0)
        run_benchmark(levels, args.families, resolutions, batches, grid["prompts"], grid["repeats"], grid["warmup"],
                      grid["budget"], grid["depth"], grid["device"], grid["dtype"], out / name, grid["threads"],
                      tiny=grid["tiny"], compile_backends=[args.compile_backend] if compiled else (),
                      eager=not compiled, deadline=deadline, log=lambda s: print(s, flush=True))
        done.append(out / name)
        paths = merge(done, out, grid["device"])
        print(f"merged report: {paths['table']}", flush=True)
    print(f"\n{paths['table'].read_text()}\nwall time {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
