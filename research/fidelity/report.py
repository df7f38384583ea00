"""The fidelity study's report: markdown tables and the pictures people look at (teacher loss
curves, real vs teacher vs student samples)."""
import json
from pathlib import Path
from statistics import mean
from typing import Dict, List, Optional, Sequence

import torch
from PIL import Image

from edit_core.util.plots import image_grid, line_chart
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


def loss_chart(histories: Dict[str, List[Dict]]) -> Image.Image:
    series = {}
    for family, history in histories.items():
        steps = [h["step"] for h in history]
        series[f"{family} (moving mean of 20)"] = (steps, smooth([h["loss"] for h in history]))
    return line_chart("Teacher training loss on the emoji set", series, "step", "loss (v / velocity MSE)", log_y=True)


def sample_grid(records: Dict, px: int, best: Optional[str]) -> Image.Image:
    t = records["teacher"]
    columns = [("real", t["real"][px]), ("teacher", t["samples"][px])]
    for name in dict.fromkeys(("a", best)):  # (a), and the best design if it is another
        if name in records["ablations"]:
            columns.append((f"student ({name})", records["ablations"][name]["samples"][px]))
    for r in records.get("baselines", {}).values():  # what a user would do instead, at the same speed
        columns.append((f"{r['label']} {r['speedup']:.1f}x", r["samples"][px]))
    n = min(len(c[1]) for c in columns)
    rows = [[picture(c[1][i]) for c in columns] for i in range(n)]
    labels = [caption.split(",")[0][:18] for caption in t["captions"][:n]]
    return image_grid(rows, labels, [c[0] for c in columns])


def score(record: Dict) -> float:
    """Fidelity used to rank designs: mean final-image error over the resolutions."""
    return mean(record["image_error"].values())


def ablation_table(family: str, records: Dict, speed: Optional[Dict[str, float]] = None, speed_px: int = 2048) -> List[str]:
    pxs = sorted(records["teacher"]["fd_teacher_real"], key=int)
    head = (["design"] + [f"image error {px} px" for px in pxs] + [f"FD to teacher {px} px" for px in pxs]
            + [f"FD to real {pxs[-1]} px", "layer error", "bank params", "distil s"]
            + ([f"EDiT/orig block {speed_px} px"] if speed else []))
    lines = [f"| {' | '.join(head)} |", "|" + "---|" + "---:|" * (len(head) - 1)]
    untrained = records["untrained"]["image_error"]
    lines.append("| untrained (a) | " + " | ".join(f"{untrained[px]:.4f}" for px in pxs) + " | " +
                 " | ".join("" for _ in range(len(head) - 1 - len(pxs))) + " |")
    for name, r in records["ablations"].items():
        cells = [f"({name}) {r['title']}"] + [f"{r['image_error'][px]:.4f}" for px in pxs]
        cells += [f"{max(r['fd_student_teacher'][px], 0.0):.3f}" for px in pxs]
        cells += [f"{max(r['fd_student_real'][pxs[-1]], 0.0):.3f}", f"{mean(r['layer_errors_after'].values()):.4f}",
                  f"{r['bank_parameters']:,}", f"{r['seconds']:.0f}"]
        if speed:
            cells.append(f"{speed[name]:.2f}x" if name in speed else "")
        lines.append("| " + " | ".join(cells) + " |")
    floor = records["teacher"]["fd_teacher_real"]
    lines.append("\nTeacher vs real held-out images (the floor): FD " +
                 ", ".join(f"{floor[px]:.3f} at {px} px" for px in pxs) + ".")
    for what, errors in records["teacher"].get("sensitivity", {}).items():
        lines.append(f"The teacher's own image error, {what} against itself: " +
                     ", ".join(f"{errors[px]:.4f} at {px} px" for px in pxs) + ".")
    return lines


def equal_speed_table(records: Dict, speed_px: int) -> List[str]:
    """The default design's student beside what a user would do instead at its speed-up."""
    from .study import DEFAULT_ABLATION
    pxs = sorted(records["teacher"]["fd_teacher_real"], key=int)
    rows = [(f"EDiT student ({DEFAULT_ABLATION}), block speed-up at {speed_px} px", records["baselines_speedup"],
             records["ablations"].get(DEFAULT_ABLATION))]
    rows += [(r["title"], r["speedup"], r) for r in records["baselines"].values()]
    head = ["at the same speed", "speed-up"] + [f"image error {px} px" for px in pxs] + \
           [f"FD to teacher {px} px" for px in pxs] + [f"FD to real {pxs[-1]} px"]
    lines = [f"| {' | '.join(head)} |", "|---|" + "---:|" * (len(head) - 1)]
    for title, speedup, r in rows:
        if r is None:
            continue
        cells = [title, f"{speedup:.2f}x"] + [f"{r['image_error'][px]:.4f}" for px in pxs]
        cells += [f"{max(r['fd_student_teacher'][px], 0.0):.3f}" for px in pxs]
        cells.append(f"{max(r['fd_student_real'][pxs[-1]], 0.0):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def layer_table(records: Dict) -> List[str]:
    names = list(records["ablations"])
    layers = list(records["ablations"][names[0]]["layer_errors_after"])
    lines = ["| layer | before | " + " | ".join(f"({n})" for n in names) + " |",
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


def attention_table(stats: Dict[str, Dict[str, Dict[str, float]]]) -> List[str]:
    """stats: teacher name -> layer -> {"entropy", "local_mass"}."""
    lines = ["| teacher | layer | row entropy (share of uniform) | mass in 3x3 neighbourhood |", "|---|---|---:|---:|"]
    for teacher, layers in stats.items():
        for layer, s in layers.items():
            lines.append(f"| {teacher} | {layer} | {s['entropy']:.3f} | {s['local_mass']:.3f} |")
    return lines


def best_design(records: Dict) -> str:
    return min(records["ablations"], key=lambda n: score(records["ablations"][n]))


def write_family(out: Path, family: str, teacher, records: Dict, speed: Optional[Dict[str, float]],
                 attention: Dict, speed_px: int = 2048) -> Path:
    """<family>.json (everything but images) and <family>_samples_<px>.png."""
    from .study import write_json
    best = best_design(records) if records["ablations"] else None
    for px in records["teacher"]["samples"]:
        save(sample_grid(records, px, best), out / f"{family}_samples_{px}px.png")
    records = dict(records, speed=speed, speed_px=speed_px, attention=attention,
                   teacher_run={"config": teacher.config.__dict__, "seconds": teacher.seconds, "source": teacher.source,
                                "history": teacher.history})
    path = out / f"{family}.json"
    if path.is_file():  # designs run separately add up, for the same teacher and settings
        old = json.loads(path.read_text())
        if old["teacher_run"]["config"] == json.loads(json.dumps(teacher.config.__dict__)) and \
                old["teacher"]["captions"] == records["teacher"]["captions"]:
            records["ablations"] = {**{k: v for k, v in old["ablations"].items() if k not in records["ablations"]},
                                    **records["ablations"]}
            records["speed"] = {**(old.get("speed") or {}), **(speed or {})} or None
    write_json(records, path)
    return path


def write_summary(out: Path) -> Path:
    """study.md and teacher_loss.png from every <family>.json in ``out``."""
    families = {f: json.loads((out / f"{f}.json").read_text()) for f in ("sd3", "pixart") if (out / f"{f}.json").is_file()}
    save(loss_chart({f: r["teacher_run"]["history"] for f, r in families.items()}), out / "teacher_loss.png")
    lines = ["# Fidelity study on teachers trained on real images", ""]
    for family, r in families.items():
        run = r["teacher_run"]
        c = run["config"]
        tail = run["history"][-20:]
        lines += [f"**{family} teacher**: width {c['width']}, depth {c['depth']}"
                  + (f", MMDiT-X attn2 in blocks {c['mmditx_layers']}" if family == "sd3" else "")
                  + f", schedule {c['schedule']} (image px, steps) at batch {c['batch_size']}; trained in "
                  f"{run['seconds']:.0f} s; final loss {sum(h['loss'] for h in tail) / len(tail):.4f}; data "
                  f"{run['source'].split()[0]}.", ""]
    lines += ["![teacher loss](teacher_loss.png)", "", "## Attention of the trained teachers and the synthetic ones", ""]
    for family, r in families.items():
        lines += attention_table(r["attention"]) + [""]
    for family, r in families.items():
        lines += [f"## {family}: student designs", ""]
        speed = {k: float(v) for k, v in (r.get("speed") or {}).items()}
        lines += ablation_table(family, r, speed or None, r.get("speed_px", 2048)) + [""]
        if r.get("baselines"):
            lines += [f"Equal speed ({family}): the default design against the teacher with fewer steps and "
                      f"ComfyUI's LazyCache:", ""] + equal_speed_table(r, r.get("speed_px", 2048)) + [""]
        lines += [f"Per-layer feature error ({family}):", ""] + layer_table(r) + [""]
        lines += [f"Best by final-image error: ({best_design(r)}). Samples: "
                  + ", ".join(f"![{family} {px}]({family}_samples_{px}px.png)" for px in r["teacher"]["fd_teacher_real"]), ""]
    path = out / "study.md"
    path.write_text("\n".join(lines) + "\n")
    return path
