"""How a teacher's own softmax attention looks, per EDiT-convertible layer: how spread out its
rows are and how much of it stays next to the query on the token grid.

Two statistics over image queries and image keys, averaged over every query, head, batch row
(cond and uncond) and model call of a short sampling run:

- entropy: a row's entropy as a fraction of log(number of keys) (1 = uniform attention, 0 =
  one key takes everything);
- local_mass: the share of a row's attention on the keys in the query's 3 x 3 token
  neighbourhood (fewer keys at the grid's edge: 9/N for an interior query under uniform
  attention, 6/N on an edge, 4/N in a corner).

For SD3 joint attention the softmax runs over [prompt; image] keys; the statistics here are of
its image-image part: the softmax of the image queries' logits restricted to the image keys
(the part EDiT's linear compressed attention replaces). MMDiT-X ``attn2`` and PixArt attention
are image-only already. The math (``attention_rows``) is explicit N x N in float64, for small
models.
"""
import argparse
import math
import sys
from typing import Dict, Optional, Tuple

import torch

from edit_core.attention.layers import split_heads
from edit_core.bank import EDiTError, init_bank
from edit_core.comfyui.env import add_comfyui_flag, setup_comfy
from edit_core.distill.teacher_data import ImageJob

STATS = ("entropy", "local_mass")


def neighbourhood_mask(grid: Tuple[int, int]) -> torch.Tensor:
    """(N, N) bool, N = h * w tokens in row-major order: key j is in query i's 3 x 3 neighbourhood."""
    h, w = grid
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    return ((rows[:, None] - rows[None]).abs() <= 1) & ((cols[:, None] - cols[None]).abs() <= 1)


def attention_rows(q: torch.Tensor, k: torch.Tensor, grid: Tuple[int, int], max_elements: int = 2**24):
    """Per-row statistics of softmax(q k^T / sqrt(d)) over image tokens, in float64.

    q, k: (..., N, d) with N = grid[0] * grid[1] tokens in row-major order (leading dims:
    batch, heads). Returns (entropy, local_mass), each (..., N): row entropy / log(N) and the
    row's attention mass inside the query's 3 x 3 neighbourhood."""
    h, w = grid
    n = h * w
    if q.ndim < 2 or q.shape != k.shape or q.shape[-2] != n:
        raise EDiTError(f"attention statistics: expected q and k of equal shape (..., {n}, d) for the {h}x{w} token "
                        f"grid, found q {tuple(q.shape)} and k {tuple(k.shape)}")
    if n < 2:
        raise EDiTError(f"attention statistics: a {h}x{w} token grid has fewer than 2 keys; use a larger image")
    lead = q.shape[:-2]
    q2, k2 = q.reshape(-1, n, q.shape[-1]).double(), k.reshape(-1, n, k.shape[-1]).double()
    mask = neighbourhood_mask(grid).double()
    scale = 1 / math.sqrt(q.shape[-1])
    chunk = max(1, max_elements // (n * n))  # bounded memory: about max_elements float64 logits at a time
    entropy, local = [], []
    for i in range(0, q2.shape[0], chunk):
        logp = torch.log_softmax((q2[i:i + chunk] @ k2[i:i + chunk].transpose(-1, -2)) * scale, dim=-1)
        p = logp.exp()
        entropy.append(-(p * logp).sum(-1) / math.log(n))
        local.append((p * mask).sum(-1))
    return torch.cat(entropy).reshape(*lead, n), torch.cat(local).reshape(*lead, n)


def attention_summary(q: torch.Tensor, k: torch.Tensor, grid: Tuple[int, int]) -> Dict[str, float]:
    """``attention_rows`` averaged over every row: {"entropy": ..., "local_mass": ...}."""
    entropy, local = attention_rows(q, k, grid)
    return {"entropy": float(entropy.mean()), "local_mass": float(local.mean())}


@torch.no_grad()
def attention_stats(model, positive, negative, resolution: Tuple[int, int], seed: int = 0, steps: int = 4,
                    cfg: float = 4.0) -> Dict[str, Dict[str, float]]:
    """{layer: {"entropy": ..., "local_mass": ...}} of a ComfyUI model's own softmax attention
    over image queries and image keys (SD3 joint layers: the image-image part, softmax restricted
    to image keys), averaged over every call of a ``steps``-step Euler sampling run of one
    ``resolution`` (width, height in pixels) image, per EDiT-convertible layer."""
    from edit_core.comfyui.model import diffusion_model, model_spec
    from edit_core.distill.trajectories import teacher_sample
    from edit_core.comfyui.patcher import apply_edit, layer_inputs

    spec = model_spec(model)
    student = apply_edit(model, init_bank(spec))  # the patch's capture sink sees every layer's inputs
    dm = diffusion_model(model)
    calls = {name: [] for name in spec.layers}

    def sink(name, grid, tensors):
        inputs = layer_inputs(dm, name, tensors)
        q, k = split_heads(inputs["q"], spec.heads), split_heads(inputs["k"], spec.heads)
        calls[name].append(attention_summary(q, k, grid))

    teacher_sample(student, positive, negative, ImageJob(tuple(resolution), 0, seed), "euler", "simple", steps, cfg,
                   capture=sink)
    return {name: {s: sum(c[s] for c in v) / len(v) for s in STATS} for name, v in calls.items()}


SYNTHETIC_RESOLUTIONS = {"sd3": (256, 256), "pixart": (384, 384)}


def synthetic_teachers(resolution: Optional[Tuple[int, int]] = None, seed: int = 0, steps: int = 4,
                       cfg: float = 4.0) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{family: attention_stats} of the tiny synthetic teachers the distillation benchmark uses
    (local by construction: edit_core/fixtures/tiny_models.py), at ``resolution`` (width, height in
    pixels; None: the benchmark's, 256 px for SD3 and 384 px for PixArt), with seeded random
    conditioning (24 tokens) in place of a text encoder."""
    from edit_core.fixtures import tiny_models
    from edit_core.comfyui.model import conditioning_dims

    teachers = {
        "sd3": lambda: tiny_models.sd3_patcher(seed=1, attention_gain=4.0, local_attention=True),
        "pixart": lambda: tiny_models.pixart_patcher(hidden=144, heads=2, depth=2, seed=1, attention_gain=3.0,
                                                     local_attention=True),
    }
    out = {}
    for family, build in teachers.items():
        model = build()
        dims = conditioning_dims(model)
        positive = tiny_models.random_conditioning("attention probe", 0, 24, *dims)
        negative = tiny_models.random_conditioning("", 0, 24, *dims)
        res = tuple(resolution) if resolution else SYNTHETIC_RESOLUTIONS[family]
        out[family] = attention_stats(model, positive, negative, res, seed, steps, cfg)
    return out


def markdown_table(stats: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """One row per (teacher, layer): mean row entropy / log(keys) and 3 x 3 neighbourhood mass."""
    rows = ["| teacher | layer | row entropy / log(keys) | attention mass in 3x3 neighbourhood |",
            "|---|---|---:|---:|"]
    for teacher, layers in stats.items():
        rows += [f"| {teacher} | {name} | {v['entropy']:.3f} | {v['local_mass']:.3f} |" for name, v in layers.items()]
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.fidelity.attention_stats", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Attention statistics of the tiny synthetic teachers, per layer.")
    p.add_argument("--resolution", type=int, help="image size in pixels (default: 256 for SD3, 384 for PixArt)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps of the probe run")
    add_comfyui_flag(p)
    args = p.parse_args(argv)
    setup_comfy(args.comfyui)
    res = (args.resolution, args.resolution) if args.resolution else None
    print(markdown_table({f"synthetic {k}": v for k, v in synthetic_teachers(res, steps=args.steps).items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
