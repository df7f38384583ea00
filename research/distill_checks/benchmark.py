"""python -m research.distill_checks.benchmark: does distillation work, and which mode works best?

On tiny teachers built from ComfyUI's own classes (an SD3.5-style MMDiT with an MMDiT-X layer
and qk-norm, and a PixArt-Sigma model at PixArt's head width 72), with trained-like, peaked
attention (its entropy is measured and reported), this distills with layer-wise only,
end-to-end only and both, at the same step budget, and measures on held-out prompts and
seeds: the relative error of the final sampled latent against the teacher's, before (untrained
bank) and after, and each layer's feature error. Writes a markdown table, loss curves and
teacher-vs-student latent previews to --out.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

from edit_core.bank import init_bank
from edit_core.comfyui.env import add_comfyui_flag, setup_comfy
from edit_core.distill.config import DistillConfig
from edit_core.util.cli import list_items
from edit_core.util.plots import error_map, image_grid, latent_preview, line_chart


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.distill_checks.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/distill", help="folder for the table and images")
    p.add_argument("--families", default="sd3,pixart")
    p.add_argument("--modes", default="layerwise,e2e,layerwise+e2e")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--prompts", type=int, default=8, help="training prompts (held-out: 2 more)")
    p.add_argument("--local-kernel", type=int, default=3, help="local value branch kernel; 0 = plain EDiT (ablation)")
    add_comfyui_flag(p)
    args = p.parse_args(argv)
    setup_comfy(args.comfyui)
    from edit_core.fixtures import tiny_models
    from edit_core.comfyui.model import conditioning_dims, model_spec
    from edit_core.comfyui.patcher import apply_edit
    from .evaluate import attention_entropy, final_latent_errors
    from edit_core.distill.train import distill
    from edit_core.distill.trajectories import sample

    teachers = {
        "sd3": (lambda: tiny_models.sd3_patcher(seed=1, attention_gain=4.0, local_attention=True), (256, 256)),
        "pixart": (lambda: tiny_models.pixart_patcher(hidden=144, heads=2, depth=2, seed=1, attention_gain=3.0,
                                                      local_attention=True), (384, 384)),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held_seeds, steps, cfg = (101, 102), 6, 3.0
    rows, records = [], {}
    for family in list_items(args.families):
        build, res = teachers[family]
        model = build()
        dims = conditioning_dims(model)
        cond = lambda text: tiny_models.random_conditioning(text, 0, 24, *dims)  # noqa: E731
        prompts, negative = [cond(f"training prompt {i}") for i in range(args.prompts)], cond("")
        held = [cond(f"held-out prompt {i}") for i in range(2)]
        entropy = attention_entropy(model, cond("entropy probe"), negative, res)
        untrained = init_bank(model_spec(model), local_kernel=args.local_kernel)
        before = mean(final_latent_errors(model, untrained, held, negative, held_seeds, res, steps=steps, cfg=cfg))
        work = Path(tempfile.mkdtemp(prefix=f"edit-bench-{family}-"))
        curves = {}
        best = None
        for mode in list_items(args.modes):
            config = DistillConfig(resolutions=(res,), seeds=(0, 1), sample_steps=steps, cfg=cfg,
                                   train_steps=args.train_steps, batch_size=4, lr=1e-2, warmup_steps=10,
                                   mode=mode, checkpoint_every=10 ** 9)
            t0 = time.perf_counter()
            result = distill(model, prompts, negative, config, work, bank=untrained)
            wall = time.perf_counter() - t0
            after = mean(final_latent_errors(model, result.bank, held, negative, held_seeds, res, steps=steps, cfg=cfg))
            layers_before = mean(result.layer_errors_before.values())
            layers_after = mean(result.layer_errors_after.values())
            rows.append(f"| {family} | {mode} | {args.train_steps} | {before:.4f} | {after:.4f} | "
                        f"{100 * (1 - after / before):.0f}% | {layers_before:.4f} | {layers_after:.4f} | "
                        f"{result.teacher_bytes / 2**20:.2f} | {result.seconds_teacher:.1f} | {result.seconds_train:.1f} | "
                        f"{wall:.1f} |")
            records[f"{family}/{mode}"] = {"final_latent_error_before": before, "final_latent_error_after": after,
                                           "layer_errors_before": result.layer_errors_before,
                                           "layer_errors_after": result.layer_errors_after,
                                           "seconds_teacher": result.seconds_teacher,
                                           "teacher_bytes": result.teacher_bytes,
                                           "seconds_train": result.seconds_train, "attention_entropy": entropy}
            curves[mode] = ([h["step"] for h in result.history], [h["loss"] for h in result.history])
            if best is None or after < best[0]:
                best = (after, mode, result.bank)
            print(rows[-1], flush=True)
        line_chart(f"Distillation loss, tiny {family} teacher", curves, "step", "relative squared error",
                   log_y=True).save(out / f"{family}_loss.png")
        grid = []
        for prompt in held:
            args_ = (negative, res[0], res[1], held_seeds[0], "euler", "simple", steps, cfg)
            teacher, raw, trained = (sample(m, prompt, *args_) for m in
                                     (model, apply_edit(model, untrained), apply_edit(model, best[2])))
            vmax = float((raw - teacher).abs().mean(1).max())
            grid.append([latent_preview(teacher), latent_preview(raw), latent_preview(trained),
                         error_map(raw, teacher, vmax), error_map(trained, teacher, vmax)])
        image_grid(grid, ["held-out 1", "held-out 2"],
                   ["teacher", "untrained EDiT", f"distilled ({best[1]})", "|untrained - teacher|",
                    "|distilled - teacher|"]).save(out / f"{family}_latents.png")
    table = ["| family | mode | steps | final-latent error, untrained | after | reduction | layer error before | "
             "after | teacher data MiB | teacher s | train s | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows]
    (out / "distill.md").write_text("\n".join(table) + "\n")
    (out / "distill.json").write_text(json.dumps(records, indent=1))
    print("\n".join(table))
    print(f"\nwrote {out}/distill.md, distill.json, *_loss.png, *_latents.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
