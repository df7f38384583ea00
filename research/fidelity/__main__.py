"""python -m research.fidelity: the fidelity study on teachers trained here on real images.

  teachers   train (or load: shipped in research/fidelity/shipped, or cached in --work)
             the SD3 and PixArt emoji teachers, then check that they draw: the classifier's
             accuracy on their samples of held-out captions against real images; writes
             teachers.json, <family>_teacher_64px.png and teacher_loss.png to --out
  study      teachers, then every student design (ablation) distilled and measured on
             held-out captions and seeds at two resolutions; writes study.md, study.json
             and PNGs to --out
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from edit_core.comfyui.env import add_comfyui_flag, setup_comfy
from edit_core.util.cli import Concatenate, comma_list
from . import emoji
from .attention_stats import attention_stats, synthetic_teachers
from .features import frechet_distance, train_classifier
from .report import write_family, write_summary


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.fidelity", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("teachers", "study"))
    p.add_argument("--families", nargs="+", type=comma_list(str), action=Concatenate, help="(default: sd3 pixart)")
    p.add_argument("--ablations", nargs="+", type=comma_list(str), action=Concatenate,
                   help="student designs, see research/fidelity/study.py (default: a b c d e f g)")
    p.add_argument("--work", default="results/fidelity/work", help="cache of teachers, classifier and teacher data "
                   "(default: results/fidelity/work)")
    p.add_argument("--out", default="results/fidelity", help="report folder (default: results/fidelity)")
    p.add_argument("--quick", action="store_true", help="the tests' small setting (seconds, not minutes)")
    p.add_argument("--retrain", action="store_true", help="train the teachers in --work even where the pack ships "
                   "them (research/fidelity/shipped): reproduces a shipped teacher; compare the printed weights "
                   "sha256 with manifest.json there")
    p.add_argument("--ship", action="store_true", help="copy the teachers into research/fidelity/shipped and record "
                   "them in its manifest.json (for the pack's maintainers)")
    p.add_argument("--speed-px", type=int, default=2048, help="also time each design's EDiT block at the family's "
                   "real width at this size (research.bench's block level); 0 = skip (default: 2048)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default (default: 0)")
    add_comfyui_flag(p)
    args = p.parse_args(argv)
    families = args.families or ["sd3", "pixart"]
    ablations = args.ablations or ["a", "b", "c", "d", "e", "f", "g"]
    setup_comfy(args.comfyui)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .teacher import FULL, QUICK, ship, train_teacher

    work, out = Path(args.work), Path(args.out)
    data = emoji.load()
    teachers = {}
    for family in families:
        config = (QUICK if args.quick else FULL)[family]
        with tqdm(total=sum(n for _, n in config.schedule), desc=f"{family} teacher", mininterval=5) as bar:
            def on_step(step, total, loss):
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            teachers[family] = train_teacher(config, data, work, on_step, retrain=args.retrain)
        t = teachers[family]
        h = t.history[-20:]
        print(f"{family}: teacher {t.file} (weights sha256 {t.digest}), trained in {t.seconds:.0f} s, "
              f"final loss {sum(x['loss'] for x in h) / len(h):.4f}", flush=True)
        if args.ship:
            print(f"{family}: shipped as {ship(t)}", flush=True)
    if args.command == "teachers":
        from .teacher_check import QUICK as QUICK_CHECK, CheckSettings, check_grid, check_teacher, summary_line, write_checks
        check = QUICK_CHECK if args.quick else CheckSettings()
        classifier = train_classifier(data, work, quick=args.quick)
        results, grids = {}, {}
        for family, teacher in teachers.items():
            t0 = time.perf_counter()
            results[family] = check_teacher(teacher, data, classifier, check, limit=4 if args.quick else 0)
            grids[family] = check_grid(teacher, results[family], check)
            print(summary_line(results[family]) + f"; {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"wrote {write_checks(Path(args.out), teachers, results, grids)}")
        return 0
    from .study import (ABLATIONS, DEFAULT_ABLATION, QUICK as QUICK_STUDY, StudySettings, block_speedups, design,
                        run_family)
    settings = QUICK_STUDY if args.quick else StudySettings()
    classifier = train_classifier(data, work, quick=args.quick)
    out.mkdir(parents=True, exist_ok=True)
    top = settings.image_px[-1]
    synthetic = synthetic_teachers(teachers[families[0]].resolution(top), steps=2 if args.quick else 4)
    for family, teacher in teachers.items():
        t0 = time.perf_counter()
        negative = teacher.conditioning("")
        attention = {f"trained {family}": attention_stats(teacher.patcher, teacher.conditioning(data.captions[0]),
                                                          negative, teacher.resolution(top), steps=2 if args.quick else 4,
                                                          cfg=settings.cfg),
                     f"synthetic {family}": synthetic[family]}
        speed = None
        if args.speed_px:  # first: the equal-speed baselines run at the default design's speed-up
            names = [n for n in ablations if family in ABLATIONS[n][2]] + [DEFAULT_ABLATION]
            speed = block_speedups(family, {n: design(n) for n in dict.fromkeys(names)}, px=args.speed_px,
                                   repeats=1 if args.quick else 2)
        records = run_family(teacher, data, classifier, frechet_distance, settings, ablations, work,
                             speedup=(speed or {}).get(DEFAULT_ABLATION, 0.0))
        print(f"{family}: study done in {time.perf_counter() - t0:.0f} s; wrote "
              f"{write_family(out, family, teacher, records, speed, attention, args.speed_px)}", flush=True)
    print(f"wrote {write_summary(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
