"""Where EDiT's time goes in one block: torch profiler tables of the EDiT and bound variants
at one point (block 0 inside a patched model call, as the bench's block level runs it; the
operators before the block are the same in both), and the operators that make up the difference.

    python -m research.bench.profile --family sd35 --px 2048
"""
import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from edit_core.comfyui.env import add_comfyui_flag, setup_comfy
from .grid import FAMILIES, default_device


def op_times(fn, device) -> dict:
    """Self time (s) per operator over one run, after one warm-up run."""
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    times = defaultdict(float)
    for e in prof.key_averages():
        times[e.key] += (e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total) / 1e6
    return dict(times)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.bench.profile", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, default="sd35")
    p.add_argument("--px", type=int, default=2048, help="square image side in pixels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=154, help="prompt tokens")
    p.add_argument("--top", type=int, default=15, help="operators listed")
    add_comfyui_flag(p)
    args = p.parse_args(argv)
    setup_comfy(args.comfyui)
    from .cases import Case, Point
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    case = Case(args.family, "block", dtype, device)
    variants, _ = case.variants(Point(args.family, "block", args.px, args.batch, args.prompt))
    edit, bound = op_times(variants["edit"], device), op_times(variants["bound"], device)
    total_e, total_b = sum(edit.values()), sum(bound.values())
    print(f"{case.describe()}, {args.px} px, batch {args.batch}, prompt {args.prompt} on {device}: "
          f"EDiT {total_e:.3f} s, bound {total_b:.3f} s (profiled; overhead {total_e / total_b - 1:.1%})\n")
    diff = sorted(((edit.get(k, 0.0) - bound.get(k, 0.0), k) for k in set(edit) | set(bound)), reverse=True)
    print("| operator | EDiT s | bound s | EDiT - bound s | share of the difference |\n|---|---|---|---|---|")
    for d, k in diff[:args.top]:
        print(f"| {k} | {edit.get(k, 0.0):.3f} | {bound.get(k, 0.0):.3f} | {d:+.3f} | {d / (total_e - total_b):.0%} |")


if __name__ == "__main__":
    main()
