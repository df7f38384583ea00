"""Teacher data: sample each image with the teacher and keep its latents (ComfyUI-aware).

The teacher is the EDiT-patched model forced onto its original attention. An APPLY_MODEL
wrapper sees every call the sampler makes: it forces the teacher path and notes the call's
sigma and input latent and, on the first call, the conditioning rows the model received
(cond and uncond). Nothing per layer is kept: training recomputes the teacher's features
online.
"""
import math
from typing import Callable, Dict, List, Optional

import torch

import comfy.model_management
import comfy.sample

from ..comfyui.patcher import TEACHER, add_wrapper_outside_edit
from .teacher_data import ImageJob, TeacherData

WRAPPER_KEY = "comfyui_edit_distill"


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


def _row(conds: Dict, i: int, n: int) -> Dict[str, torch.Tensor]:
    return {k: v[i].detach().clone() for k, v in conds.items()
            if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n}


def teacher_sample(trainer, positive, negative, job: ImageJob, sampler: str, scheduler: str, steps: int, cfg: float,
                   on_call: Optional[Callable[[], None]] = None, capture=None):
    """Sample one image with the teacher. Returns (final latent (C, h, w), call sigmas (n,),
    call inputs (n, C, h, w), cond rows, uncond rows or None). ``capture``: an optional
    capture sink for every call."""
    sigmas: List[float] = []
    states: List[torch.Tensor] = []
    rows: Dict[int, Dict[str, torch.Tensor]] = {}

    def teacher_call(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        n = x.shape[0]
        kinds = transformer_options.get("cond_or_uncond", [0])
        for i in range(n):
            kind = kinds[i * len(kinds) // n]
            if kind not in rows:
                rows[kind] = _row(dict(kwargs, c_crossattn=c_crossattn), i, n)
        sigmas.append(float(t.reshape(-1)[0]))
        states.append(x[0].detach().to("cpu", copy=True))  # CFG's rows share the call's input
        to = dict(transformer_options, edit_mode=TEACHER, edit_capture=capture)
        out = executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
        if on_call:
            on_call()
        return out

    m = trainer.clone()
    add_wrapper_outside_edit(m, WRAPPER_KEY, teacher_call)  # it sets edit_mode: EDiT's wrapper must see it
    final = sample(m, positive, negative, job.resolution[0], job.resolution[1], job.seed, sampler, scheduler,
                   steps, cfg)
    return final[0], torch.tensor(sigmas, dtype=torch.float64), torch.stack(states), rows[0], rows.get(1)


@torch.no_grad()
def generate(trainer, conds, negative, jobs: List[ImageJob], data: TeacherData, config, rank: int = 0, world: int = 1,
             on_call: Optional[Callable[[], None]] = None):
    """Write the images of ``jobs`` this rank owns (round-robin) that are not on disk yet, one
    shard at a time (nothing accumulates in memory)."""
    comfy.model_management.load_models_gpu([trainer])
    for j, job in enumerate(jobs):
        if j % world != rank or data.has(job, needs_negative(config)):
            continue
        latent, sigmas, states, cond, uncond = teacher_sample(trainer, conds[job.prompt], negative, job,
                                                              config.sampler, config.scheduler, config.sample_steps,
                                                              config.cfg, on_call)
        data.write(job, latent, sigmas, states, cond, uncond)


def needs_negative(config) -> bool:
    """ComfyUI skips the uncond rows at CFG 1 (comfy.samplers' cfg1 optimisation)."""
    return not math.isclose(config.cfg, 1.0)
