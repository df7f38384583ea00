"""The fidelity study's report: markdown tables and the pictures people look at (teacher loss
curves, real vs teacher vs student samples)."""
from pathlib import Path
from statistics import mean
from typing import Dict, List, Optional, Sequence

import torch
from PIL import Image

from ..plots import image_grid, line_chart
from .emoji import to_rgb


def picture(x: torch.Tensor, scale: int = 2) -> Image.Image:
    """One [-1, 1] RGBA image (4, h, w) over white, upscaled ``scale``x (nearest)."""
    rgb = to_rgb(x[None])[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(rgb, "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def smooth(values: Sequence[float], window: int = 20) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_chart(teachers: Dict[str, object]) -> Image.Image:
    series = {}
    for family, t in teachers.items():
        steps = [h["step"] for h in t.history]
        series[f"{family} (moving mean of 20)"] = (steps, smooth([h["loss"] for h in t.history]))
    return line_chart("Teacher training loss on the emoji set", series, "step", "loss (eps / velocity MSE)", log_y=True)


def sample_grid(records: Dict, px: int, best: Optional[str]) -> Image.Image:
    t = records["teacher"]
    columns = [("real", t["real"][px]), ("teacher", t["samples"][px])]
    for name in ("a", best):
        if name and name in records["ablations"] and (name == "a" or name != "a"):
            if all(c[0] != f"student ({name})" for c in columns):
                columns.append((f"student ({name})", records["ablations"][name]["samples"][px]))
    n = min(len(c[1]) for c in columns)
    rows = [[picture(c[1][i]) for c in columns] for i in range(n)]
    labels = [caption.split(",")[0][:18] for caption in t["captions"][:n]]
    return image_grid(rows, labels, [c[0] for c in columns])


def score(record: Dict) -> float:
    """Fidelity used to rank designs: mean final-image error over the resolutions."""
    return mean(record["image_error"].values())


def ablation_table(family: str, records: Dict, speed: Optional[Dict[str, float]] = None) -> List[str]:
    pxs = sorted(records["teacher"]["fd_teacher_real"], key=int)
    head = (["design"] + [f"image error {px} px" for px in pxs] + [f"FD to teacher {px} px" for px in pxs]
            + [f"FD to real {pxs[-1]} px", "layer error", "bank params", "distil s"]
            + (["EDiT/orig 2048 px"] if speed else []))
    lines = [f"| {' | '.join(head)} |", "|" + "---|" + "---:|" * (len(head) - 1)]
    untrained = records["untrained"]["image_error"]
    lines.append("| untrained (a) | " + " | ".join(f"{untrained[px]:.4f}" for px in pxs) + " | " +
                 " | ".join("" for _ in range(len(head) - 1 - len(pxs))) + " |")
    for name, r in records["ablations"].items():
        cells = [f"({name}) {r['title']}"] + [f"{r['image_error'][px]:.4f}" for px in pxs]
        cells += [f"{r['fd_student_teacher'][px]:.3f}" for px in pxs]
        cells += [f"{r['fd_student_real'][pxs[-1]]:.3f}", f"{mean(r['layer_errors_after'].values()):.4f}",
                  f"{r['bank_parameters']:,}", f"{r['seconds']:.0f}"]
        if speed:
            cells.append(f"{speed[name]:.2f}x" if name in speed else "")
        lines.append("| " + " | ".join(cells) + " |")
    floor = records["teacher"]["fd_teacher_real"]
    lines.append(f"\nTeacher vs real held-out images (the floor): FD " +
                 ", ".join(f"{floor[px]:.3f} at {px} px" for px in pxs) + ".")
    return lines


def layer_table(records: Dict) -> List[str]:
    names = list(records["ablations"])
    layers = list(records["ablations"][names[0]]["layer_errors_after"])
    lines = [f"| layer | before | " + " | ".join(f"({n})" for n in names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for layer in layers:
        before = records["ablations"][names[0]]["layer_errors_before"][layer]
        lines.append(f"| {layer} | {before:.4f} | " +
                     " | ".join(f"{records['ablations'][n]['layer_errors_after'][layer]:.4f}" for n in names) + " |")
    return lines


def save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
