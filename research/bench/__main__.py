"""python -m research.bench: time SDPA attention, EDiT and the Amdahl bound in ComfyUI's
SD3.5-Medium and PixArt-Sigma classes at their real widths (random weights)."""
import argparse
import time

import torch

from edit_core.comfyui.env import add_comfyui_flag, setup_comfy
from .grid import BATCHES, FAMILIES, LEVELS, PROMPTS, RESOLUTIONS, SDPA_NAME, default_device
from .options import list_option

QUICK = dict(levels=["block"], resolutions=[512, 1024], batches=[1], prompts=[154], repeats=3, budget=20.0)
# The smoke test: every level and family, two small images (PixArt needs >= 384 px: its position
# embedding divides by the size rounded to 512 px steps), one timed run each, one torch thread
# (tiny ops on a busy machine otherwise wait on their thread pool): well under a minute.
TINY = dict(levels=list(LEVELS), resolutions=[384, 512], batches=[1], prompts=[16], repeats=1, warmup=1, budget=5.0,
            threads=1)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m research.bench", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__ + (
        f" Baseline and EDiT's softmax parts run ComfyUI's {SDPA_NAME}; the bound replaces image self-attention "
        "by a zero-cost stand-in. Writes results.md, results.json and log-log PNG plots to --out."))
    list_option(p, "--levels", LEVELS, allowed=LEVELS)
    list_option(p, "--families", FAMILIES, allowed=FAMILIES)
    list_option(p, "--resolutions", RESOLUTIONS, int, help="square images, pixels")
    list_option(p, "--batches", BATCHES, int, help="2 = one CFG step")
    list_option(p, "--prompts", PROMPTS, int, help="prompt tokens")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant at most")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant (the first measures memory)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds of timed runs per variant and point: fewer repeats when a run is long")
    p.add_argument("--depth", type=int, default=None, help="blocks in the model level; unset: 2 on CPU, all on CUDA")
    p.add_argument("--device", default=None, help="unset: cuda if present, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="unset: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; unset: torch's choice")
    list_option(p, "--compile", (), help="also run the model level under ComfyUI's torch.compile wrapper (the "
                                         "TorchCompileModel node's path) with these backends, e.g. inductor")
    p.add_argument("--tiny", action="store_true",
                   help="smoke test of the machinery, not a benchmark: tiny widths and " + _preset(TINY))
    p.add_argument("--quick", action="store_true", help=_preset(QUICK))
    add_comfyui_flag(p)
    p.add_argument("--out", default="results", help="folder for results.md, results.json and the PNG plots")
    p.add_argument("--merge", nargs="+", metavar="FOLDER", default=None,
                   help="measure nothing: merge the results of earlier runs into one report in --out")
    return p


def _preset(values: dict) -> str:
    return ", ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in values.items()) + \
        " (options given explicitly win)"


def parse(argv=None) -> argparse.Namespace:
    """The command line with --quick / --tiny presets applied (explicit options win)."""
    p = parser()
    args = p.parse_args(argv)
    for flag, preset in (("quick", QUICK), ("tiny", TINY)):
        if getattr(args, flag):
            given = {a.dest for a in p._actions if a.dest in preset and getattr(args, a.dest) != a.default}
            for k, v in preset.items():
                if k not in given:
                    setattr(args, k, v)
    return args


def main(argv=None):
    args = parse(argv)
    setup_comfy(args.comfyui)
    from .report import merge, table, target_checks
    from .run import run_benchmark
    if args.merge:
        paths = merge(args.merge, args.out, args.device or str(default_device()))
        print(paths["table"].read_text())
        return
    print(f"attention: {SDPA_NAME} for baseline and EDiT's softmax parts")
    if args.tiny:
        print(f"tiny smoke test (tiny widths; timings mean nothing): levels {' '.join(args.levels)}; families "
              f"{' '.join(args.families)}; {' '.join(map(str, args.resolutions))} px; batch "
              f"{' '.join(map(str, args.batches))}; prompt {' '.join(map(str, args.prompts))} tokens; "
              f"{args.repeats} timed run(s) per variant; {args.threads or 'default'} torch thread(s)")
    t0 = time.time()
    rows, paths = run_benchmark(args.levels, args.families, args.resolutions, args.batches, args.prompts, args.repeats,
                                args.warmup, args.budget, args.depth, args.device,
                                DTYPES[args.dtype] if args.dtype else None, args.out, args.threads, args.tiny,
                                compile_backends=args.compile)
    print()
    print(table(rows))
    print()
    print("targets not checked: tiny widths" if args.tiny else "\n".join(target_checks(rows)))
    print(f"\nran {len(rows)} points in {time.time() - t0:.0f} s; written: " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
