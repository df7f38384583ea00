"""python -m edit_core.bench: the EDiT benchmark from the command line (see --help)."""
import argparse
import time

import torch

from . import BATCHES, FAMILIES, LEVELS, PROMPTS, RESOLUTIONS, default_device, run_benchmark, table, target_checks
from .report import merge
from .backends import SDPA_NAME

QUICK = dict(levels=["block"], resolutions=[512, 1024], batches=[1], prompts=[154], repeats=3, budget=20.0)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m edit_core.bench", description=__doc__ + (
        f" Baseline and EDiT's softmax parts run ComfyUI's {SDPA_NAME}; the bound replaces image self-attention "
        "by a zero-cost stand-in."))
    p.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--resolutions", nargs="+", type=int, default=list(RESOLUTIONS), help="square images, pixels")
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), help="2 = one CFG step")
    p.add_argument("--prompts", nargs="+", type=int, default=list(PROMPTS), help="prompt tokens")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant at most")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant (the first measures memory)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds of timed runs per variant and point: fewer repeats when a run is long")
    p.add_argument("--depth", type=int, default=None, help="blocks in the model level (default: 2 on CPU, all on CUDA)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tiny", action="store_true", help="tiny widths: a smoke test of the machinery, not a benchmark")
    p.add_argument("--out", default="results", help="folder for results.md, results.json and the PNG plots")
    p.add_argument("--merge", nargs="+", metavar="FOLDER", help="measure nothing: merge the results of earlier runs "
                                                               "into one report in --out")
    p.add_argument("--quick", action="store_true", help="block level, 512 and 1024 px, batch 1, 154 tokens, "
                                                        "3 repeats, 20 s budget (explicit options still win)")
    args = p.parse_args(argv)
    if args.quick:
        given = {a.dest for a in p._actions if a.dest in QUICK and getattr(args, a.dest) != a.default}
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
    if args.merge:
        paths = merge(args.merge, args.out, args.device or str(default_device()))
        print(paths["table"].read_text())
        return
    print(f"attention: {SDPA_NAME} for baseline and EDiT's softmax parts")
    t0 = time.time()
    rows, paths = run_benchmark(args.levels, args.families, args.resolutions, args.batches, args.prompts, args.repeats,
                                args.warmup, args.budget, args.depth, args.device,
                                DTYPES[args.dtype] if args.dtype else None, args.out, args.threads, args.tiny)
    print()
    print(table(rows))
    print()
    print("\n".join(target_checks(rows)))
    print(f"\nwall time {time.time() - t0:.0f} s; written: " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
