"""Teacher trajectories: sample with the teacher and record every model call (ComfyUI-aware).

The teacher is the EDiT-patched model forced onto its original attention. An APPLY_MODEL
wrapper sees every call the sampler makes (cond and uncond rows of each step), runs it as
the teacher with a capture sink, and keeps per batch row: the input latent, sigma, the
conditioning the sampler passed, the denoised output and every converted layer's inputs and
attention output. Nothing is re-run later: these are the training data.
"""
from typing import Callable, Dict, List, Optional

import torch

import comfy.model_management
import comfy.sample

from ..patcher import TEACHER, add_wrapper_outside_edit
from .cache import Job, TrajectoryCache, input_group

WRAPPER_KEY = "comfyui_edit_distill"


def _rows(t: torch.Tensor, n: int) -> List[torch.Tensor]:
    return list(t.unbind(0)) if torch.is_tensor(t) and t.ndim > 0 and t.shape[0] == n else []


def empty_latent(patcher, width: int, height: int, batch: int = 1) -> torch.Tensor:
    channels = patcher.get_model_object("latent_format").latent_channels
    return torch.zeros(batch, channels, height // 8, width // 8)


def sample(patcher, positive, negative, width: int, height: int, seed: int, sampler: str, scheduler: str,
           steps: int, cfg: float) -> torch.Tensor:
    """One image's final latent, exactly as KSampler would sample it."""
    latent = empty_latent(patcher, width, height)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               seed=seed, disable_pbar=True)


def record_trajectory(student, positive, negative, job: Job, sampler: str, scheduler: str, steps: int, cfg: float,
                      on_call: Optional[Callable[[], None]] = None):
    """Sample one trajectory with the teacher; return (grid, samples, info, final latent)."""
    samples: List[Dict[str, torch.Tensor]] = []
    info: List[Dict] = []
    grid = []

    def teacher_call(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        captured = {}

        def sink(name, call_grid, tensors):
            grid[:] = call_grid
            captured[name] = tensors

        to = dict(transformer_options, edit_mode=TEACHER, edit_capture=sink)
        out = executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
        n = x.shape[0]
        conds = dict(kwargs, c_crossattn=c_crossattn)
        kinds = transformer_options.get("cond_or_uncond", [])
        for i in range(n):
            s = {"x": x[i], "t": t[i], "out": out[i]}
            s.update({f"cond.{k}": rows[i] for k, v in conds.items() if (rows := _rows(v, n))})
            for name, tensors in captured.items():
                for field, v in tensors.items():
                    key = f"ref.{name}" if field == "out" else f"in.{input_group(name)}.{field}"
                    s[key] = v[i]
            samples.append(s)
            kind = kinds[i * len(kinds) // n] if kinds else None
            info.append({"step": len(info) // max(n, 1), "sigma": float(t[i]), "uncond": kind == 1})
        if on_call:
            on_call()
        return out

    m = student.clone()
    add_wrapper_outside_edit(m, WRAPPER_KEY, teacher_call)  # it sets edit_mode: EDiT's wrapper must see it
    final = sample(m, positive, negative, job.resolution[0], job.resolution[1], job.seed, sampler, scheduler,
                   steps, cfg)
    return tuple(grid), samples, info, final


@torch.no_grad()
def generate(student, conds, negative, jobs: List[Job], cache: TrajectoryCache, config, rank: int = 0,
             world: int = 1, on_call: Optional[Callable[[], None]] = None):
    """Write the shards of ``jobs`` this rank owns (round-robin) that are not on disk yet."""
    comfy.model_management.load_models_gpu([student])
    for j, job in enumerate(jobs):
        if j % world != rank or cache.has(job):
            continue
        grid, samples, info, _ = record_trajectory(student, conds[job.prompt], negative, job, config.sampler,
                                                   config.scheduler, config.sample_steps, config.cfg, on_call)
        cache.write(job, grid, samples, info)
