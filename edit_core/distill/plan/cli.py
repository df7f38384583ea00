"""The plan tool's command line (``python -m edit_core.distill.plan``, ``bash scripts/edit.sh plan``)."""
import argparse
import json

from ...comfyui.env import add_comfyui_flag, setup_comfy
from ...errors import EDiTError
from ...util.cli import HelpFormatter, comma_list
from ...util.settings import add_flags
from ..config import DATA, SETTINGS, TRAINING, DistillConfig
from . import __doc__ as PLAN_DOC
from .harness import parse_bytes
from .search import Throughput, device_budget, make_plan, plan_json


def build_parser():
    p = argparse.ArgumentParser(prog="python -m edit_core.distill.plan", description=PLAN_DOC, allow_abbrev=False,
                                formatter_class=lambda prog: HelpFormatter(prog, width=100))
    p.add_argument("--model", default="sd35-medium",
                   help="sd35-medium, pixart-sigma, or a checkpoint file (only its header is read)")
    p.add_argument("--resolutions", nargs="+", type=comma_list(int), default=[[512, 1024, 2048]],
                   help="square training resolutions in px, e.g. 512 1024 2048 or 512,1024")
    p.add_argument("--batch-size", type=int, default=1,
                   help="examples per training step (they run one after another: memory hardly changes)")
    # The distillation's own --mode and --layers-per-step; the others differ here: a plan looks at
    # one example at a time by default, several resolutions, and counts of prompts and seeds.
    add_flags({DATA: p, TRAINING: p}, [s for s in SETTINGS if s.name in ("mode", "layers_per_step", "train_steps",
                                                                          "sample_steps", "layerwise_fraction")])
    p.add_argument("--device-memory", default="24GiB", help="memory of the GPU to plan for")
    p.add_argument("--reserve", default="1GiB", help="kept free for the CUDA context and fragmentation")
    p.add_argument("--prompts", type=int, default=4, help="prompts, for the teacher-data size")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt, for the teacher-data size")
    p.add_argument("--tflops", type=float, default=Throughput.tflops,
                   help="the card's bf16 tensor TFLOPS, for the time estimate (default: an RTX 4090's, 24 GB)")
    p.add_argument("--utilisation", type=float, default=Throughput.utilisation,
                   help="share of --tflops a distillation step reaches (an assumption)")
    p.add_argument("--json", help="also write the plan as JSON to this file")
    add_comfyui_flag(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_comfy(args.comfyui)
    from ...comfyui.architectures import model_config_for
    resolutions = sorted({r for group in args.resolutions for r in group})
    if not resolutions or min(resolutions) < 64 or any(r % 16 for r in resolutions):
        raise EDiTError(f"--resolutions must be multiples of 16 px, at least 64, got {resolutions}")
    if args.batch_size < 1:
        raise EDiTError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.prompts < 1 or args.seeds < 1:
        raise EDiTError(f"--prompts and --seeds must be >= 1, got {args.prompts} and {args.seeds}")
    if args.tflops <= 0 or not 0 < args.utilisation <= 1:
        raise EDiTError(f"--tflops must be > 0 and --utilisation in (0, 1], got {args.tflops} and {args.utilisation}")
    config = DistillConfig(resolutions=tuple((r, r) for r in resolutions), seeds=tuple(range(args.seeds)),
                           mode=args.mode, batch_size=args.batch_size, layers_per_step=args.layers_per_step,
                           train_steps=args.train_steps, sample_steps=args.sample_steps,
                           layerwise_fraction=args.layerwise_fraction)
    device_memory, reserve = parse_bytes(args.device_memory), parse_bytes(args.reserve)
    budget_line = device_budget("cuda", reserve, device_memory)
    plan = make_plan(model_config_for(args.model), args.model, [(r, r) for r in resolutions], args.mode,
                     args.batch_size, budget_line, prompts=args.prompts, seeds=args.seeds,
                     layers_per_step=args.layers_per_step, with_targets=True, distill_config=config,
                     throughput=Throughput(args.tflops, args.utilisation))
    print(plan.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan_json(plan), f, indent=1)
    return 0 if plan.fits else 1
