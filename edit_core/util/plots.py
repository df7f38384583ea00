"""Small PNG charts drawn with Pillow (ComfyUI's own image dependency): bar charts for
speed reports, line charts (optionally log-log) for loss curves and speed vs resolution,
image grids for teacher-vs-student comparisons. No plotting library needed."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]
W, H = 800, 480
MARGIN = (80, 50, 30, 60)  # left, top, right, bottom


def _font(size=14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _fmt(v: float) -> str:
    """Plain numbers where they fit (4096, 0.05, 2.5, 30,000), exponents only far out."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e7 or a < 1e-3:
        return f"{v:.1e}"
    if a >= 100 or float(v).is_integer():
        return f"{v:,.0f}" if a >= 1e4 else f"{v:.0f}"
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, log: bool) -> List[float]:
    """Round tick values covering [lo, hi]: 1-2-5 steps (log: per decade, thinned to at most
    about 8), so a range inside one decade still gets labelled ticks."""
    if log:
        lo_e, hi_e = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        for mantissas in ((1, 2, 5), (1, 3), (1,)):
            vals = [m * 10.0 ** e for e in range(lo_e, hi_e + 1) for m in mantissas]
            below = max([v for v in vals if v <= lo], default=vals[0])
            above = min([v for v in vals if v >= hi], default=vals[-1])
            vals = [v for v in vals if below <= v <= above]
            if len(vals) <= 8:
                return vals
        step = max(1, math.ceil((hi_e - lo_e) / 8))
        return [10.0 ** e for e in range(lo_e, hi_e + 1, step)]
    step = 10 ** (math.floor(math.log10(max(hi - lo, 1e-12))) - 1)
    for m in (1, 2, 5, 10, 20, 50):  # 7,000 steps: 2,000 apart, not 100
        if (hi - lo) / (step * m) <= 6:
            step *= m
            break
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(math.ceil((hi - start) / step - 1e-9) + 1)]


def line_chart(title: str, series: Dict[str, Tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
               log_x: bool = False, log_y: bool = False, dashed: Sequence[str] = (),
               x_ticks: Optional[Sequence[float]] = None) -> Image.Image:
    """Lines (with markers) on shared axes, every tick labelled; log scales drop non-positive
    points and span whole ticks. ``x_ticks``: the x values to label (e.g. the resolutions
    measured) instead of round numbers."""
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = {k: [(x, y) for x, y in zip(xs, ys) if (x > 0 or not log_x) and (y > 0 or not log_y)
               and math.isfinite(x) and math.isfinite(y)] for k, (xs, ys) in series.items()}
    allx = [x for p in pts.values() for x, _ in p] or [1.0]
    ally = [y for p in pts.values() for _, y in p] or [1.0]
    tx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    ty = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x0, x1 = min(allx), max(allx)
    y0, y1 = min(ally), max(ally)
    if not log_y:
        y0 = min(y0, 0.0)
    xt = sorted(x_ticks) if x_ticks else _ticks(x0, x1, log_x)
    yt = _ticks(y0, y1, log_y)
    x0, x1 = min(x0, xt[0]), max(x1, xt[-1])
    y0, y1 = min(y0, yt[0]), max(y1, yt[-1])
    l, t, r, b = MARGIN
    span_x = (tx(x1) - tx(x0)) or 1.0
    span_y = (ty(y1) - ty(y0)) or 1.0

    def px(x, y):
        return (l + (tx(x) - tx(x0)) / span_x * (W - l - r), H - b - (ty(y) - ty(y0)) / span_y * (H - t - b))

    f = _font(14)
    d.rectangle([l, t, W - r, H - b], outline="black")
    for v in yt:
        if y0 <= v <= y1:
            _, yy = px(x0, v)
            d.line([l, yy, W - r, yy], fill=(230, 230, 230))
            d.line([l - 4, yy, l, yy], fill="black")
            d.text((l - 6, yy), _fmt(v), fill="black", font=f, anchor="rm")
    for v in xt:
        if x0 <= v <= x1:
            xx, _ = px(v, y0)
            d.line([xx, t, xx, H - b], fill=(230, 230, 230))
            d.line([xx, H - b, xx, H - b + 4], fill="black")
            d.text((xx, H - b + 10), _fmt(v), fill="black", font=f, anchor="mt")
    for i, (name, p) in enumerate(pts.items()):
        color = PALETTE[i % len(PALETTE)]
        xy = [px(x, y) for x, y in p]
        if len(xy) > 1:
            if name in dashed:
                for a, c in zip(xy[:-1], xy[1:]):
                    for s in np.linspace(0, 1, 12)[::2]:
                        e = min(s + 1 / 11, 1)
                        d.line([a[0] + (c[0] - a[0]) * s, a[1] + (c[1] - a[1]) * s,
                                a[0] + (c[0] - a[0]) * e, a[1] + (c[1] - a[1]) * e], fill=color, width=2)
            else:
                d.line(xy, fill=color, width=2)
        if len(xy) <= 40:
            for x, y in xy:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        for a, e in (((10, 17), (23, 30)) if name in dashed else ((10, 30),)):
            d.line([l + a, t + 12 + 18 * i, l + e, t + 12 + 18 * i], fill=color, width=3)
        d.text((l + 36, t + 12 + 18 * i), name, fill="black", font=f, anchor="lm")
    d.text((W / 2, 20), title, fill="black", font=_font(18), anchor="mm")
    d.text((W / 2, H - 18), xlabel + (" (log)" if log_x else ""), fill="black", font=f, anchor="mm")
    d.text((12, t - 20), ylabel + (" (log)" if log_y else ""), fill="black", font=f, anchor="lm")
    return img


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float], unit: str,
              note: Optional[str] = None) -> Image.Image:
    """Horizontal bars with their values written out."""
    img = Image.new("RGB", (W, 120 + 60 * len(labels)), "white")
    d = ImageDraw.Draw(img)
    f = _font(16)
    d.text((W / 2, 24), title, fill="black", font=_font(20), anchor="mm")
    vmax = max(values) if values else 1.0
    left, right = 220, W - 160
    for i, (label, v) in enumerate(zip(labels, values)):
        y = 60 + 60 * i
        d.text((left - 10, y + 20), label, fill="black", font=f, anchor="rm")
        d.rectangle([left, y, left + (right - left) * (v / vmax if vmax else 0), y + 40], fill=PALETTE[i % len(PALETTE)])
        d.text((left + (right - left) * (v / vmax if vmax else 0) + 8, y + 20), f"{_fmt(v)} {unit}", fill="black",
               font=f, anchor="lm")
    if note:
        d.text((W / 2, img.height - 30), note, fill="black", font=f, anchor="mm")
    return img


def paired_bar_chart(title: str, labels: Sequence[str], first: Sequence[float], second: Sequence[float],
                     names: Tuple[str, str], unit: str = "") -> Image.Image:
    """Two horizontal bars per label (e.g. before/after), on a shared linear scale."""
    img = Image.new("RGB", (W, 110 + 44 * len(labels)), "white")
    d = ImageDraw.Draw(img)
    f = _font(14)
    d.text((W / 2, 22), title, fill="black", font=_font(18), anchor="mm")
    vmax = max(list(first) + list(second) + [1e-12])
    left, right = 230, W - 120
    for i, (label, a, b) in enumerate(zip(labels, first, second)):
        y = 50 + 44 * i
        d.text((left - 8, y + 17), label, fill="black", font=f, anchor="rm")
        for j, v in enumerate((a, b)):
            x1 = left + (right - left) * v / vmax
            d.rectangle([left, y + 17 * j, x1, y + 17 * j + 15], fill=PALETTE[j])
            d.text((x1 + 6, y + 17 * j + 8), f"{_fmt(v)}{unit}", fill="black", font=f, anchor="lm")
    for j, name in enumerate(names):
        y = img.height - 40 + 18 * j
        d.rectangle([left, y, left + 14, y + 12], fill=PALETTE[j])
        d.text((left + 20, y + 6), name, fill="black", font=f, anchor="lm")
    return img


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = ()) -> Image.Image:
    """Images in a grid with optional labels (all cells take the first image's size)."""
    cw, ch = rows[0][0].size
    lw = 140 if row_labels else 0
    th = 28 if col_labels else 0
    grid = Image.new("RGB", (lw + cw * max(len(r) for r in rows), th + ch * len(rows)), "white")
    d = ImageDraw.Draw(grid)
    f = _font(14)
    for j, label in enumerate(col_labels):
        d.text((lw + cw * j + cw / 2, th / 2), label, fill="black", font=f, anchor="mm")
    for i, row in enumerate(rows):
        if i < len(row_labels):
            d.text((lw / 2, th + ch * i + ch / 2), row_labels[i], fill="black", font=f, anchor="mm")
        for j, im in enumerate(row):
            grid.paste(im.resize((cw, ch)), (lw + cw * j, th + ch * i))
    return grid


def latent_preview(latent: torch.Tensor, scale: int = 8) -> Image.Image:
    """A latent's first three channels as RGB (each min-max normalised), upscaled ``scale``x:
    enough to see whether two latents agree, without a VAE."""
    x = latent[0, :3].float()
    if x.shape[0] < 3:
        x = x[:1].expand(3, -1, -1)
    lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-8) * 255).byte().permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(x)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def error_map(latent: torch.Tensor, reference: torch.Tensor, vmax: float, scale: int = 8) -> Image.Image:
    """|latent - reference| averaged over channels, black (0) to white (vmax), upscaled."""
    err = (latent[0].float() - reference[0].float()).abs().mean(0)
    x = (err / max(vmax, 1e-12)).clamp(0, 1).mul(255).byte().cpu().numpy()
    img = Image.fromarray(x).convert("RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def to_comfy_image(img: Image.Image) -> torch.Tensor:
    """PIL image -> ComfyUI IMAGE tensor (1, H, W, 3) in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)
