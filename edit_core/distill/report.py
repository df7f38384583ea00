"""What a distillation run did, as text and images."""
from typing import List

from ..plots import line_chart, paired_bar_chart
from .train import DistillResult


def loss_curve(result: DistillResult):
    series = {}
    for h in result.history:
        name = f"{'layer-wise' if h['mode'] == 'layerwise' else 'end-to-end'} {h['resolution'][0]}x{h['resolution'][1]}"
        xs, ys = series.setdefault(name, ([], []))
        xs.append(h["step"])
        ys.append(h["loss"])
    return line_chart("EDiT distillation loss", series, "step", "relative squared error", log_y=True)


def layer_error_chart(result: DistillResult):
    names = list(result.layer_errors_before)
    return paired_bar_chart("Per-layer feature error (relative, teacher inputs)", names,
                            [result.layer_errors_before[n] for n in names],
                            [result.layer_errors_after.get(n, 0.0) for n in names], ("before", "after"))


def layer_error_table(result: DistillResult) -> List[str]:
    lines = ["| layer | error before | error after | change |", "|---|---:|---:|---:|"]
    for name, before in result.layer_errors_before.items():
        after = result.layer_errors_after.get(name, float("nan"))
        lines.append(f"| {name} | {before:.4f} | {after:.4f} | {100 * (after - before) / before:+.1f}% |")
    return lines


def report_text(result: DistillResult) -> str:
    c = result.config
    last = result.history[-1] if result.history else {}
    lines = [
        "EDiT distillation",
        f"mode {c.mode}, {c.train_steps} steps x batch {c.batch_size}, lr {c.lr}, resolutions "
        + ", ".join(f"{w}x{h}" for w, h in c.resolutions),
        f"teacher data: {c.sampler}/{c.scheduler}, {c.sample_steps} steps, cfg {c.cfg}, seeds {list(c.seeds)}; "
        f"{result.seconds_teacher:.1f} s",
        f"training: {result.seconds_train:.1f} s, final loss {last.get('loss', float('nan')):.4f}"
        + (f" (resumed from the checkpoint at step {result.resumed_from})" if result.resumed_from else ""),
        "",
        *layer_error_table(result),
    ]
    return "\n".join(lines)
