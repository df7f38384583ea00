"""What a distillation run did, as text and images."""
import math
from typing import List

from ..util.plots import line_chart, paired_bar_chart
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
    """Bars of each layer's error before and after; a non-finite error is drawn as 0 and said
    in the title (a chart must not fail where the run's numbers did)."""
    names = list(result.layer_errors_before)
    before = [result.layer_errors_before[n] for n in names]
    after = [result.layer_errors_after.get(n, 0.0) for n in names]
    bad = not all(math.isfinite(v) for v in before + after)
    title = "Per-layer feature error (relative, teacher inputs)" + (": non-finite values drawn as 0" if bad else "")
    return paired_bar_chart(title, names, [v if math.isfinite(v) else 0.0 for v in before],
                            [v if math.isfinite(v) else 0.0 for v in after], ("before", "after"))


def layer_error_table(result: DistillResult) -> List[str]:
    lines = ["| layer | error before | error after | change |", "|---|---:|---:|---:|"]
    for name, before in result.layer_errors_before.items():
        after = result.layer_errors_after.get(name, float("nan"))
        change = f"{100 * (after - before) / before:+.1f}%" if before and math.isfinite(before) else "n/a"
        lines.append(f"| {name} | {before:.4f} | {after:.4f} | {change} |")
    return lines


def report_text(result: DistillResult) -> str:
    c = result.config
    last = result.history[-1] if result.history else {}
    lines = [
        "EDiT distillation",
        f"mode {c.mode}, {c.train_steps} steps x batch {c.batch_size}, lr {c.lr}, resolutions "
        + ", ".join(f"{w}x{h}" for w, h in c.resolutions),
        f"teacher data: {c.sampler}/{c.scheduler}, {c.sample_steps} steps, cfg {c.cfg}, seeds {list(c.seeds)}; "
        f"{result.seconds_teacher:.1f} s, {result.teacher_bytes / 2**20:.1f} MiB on disk",
        f"training: {result.seconds_train:.1f} s, final loss {last.get('loss', float('nan')):.4f}"
        + (f" (resumed from the checkpoint at step {result.resumed_from})" if result.resumed_from else ""),
        "",
        *layer_error_table(result),
    ]
    return "\n".join(lines)
