"""Training examples from teacher data, each a pure function of (seed, step, slot).

An example takes a stored image, one of the calls its sampler made (its sigma), the
prompt's (or, with CFG, half of the time the negative prompt's) conditioning, and the
model input of that call: the stored state when the image kept it (small images keep all),
else the final latent x0 re-noised to the call's sigma with the noise the image was sampled
from (regenerated from its seed), by the model's own ``model_sampling.noise_scaling``
(rectified flow for SD3, eps for PixArt). A rectified-flow sampler moves close to the line
between its starting noise and its final latent, so these are near the states the student
will meet when it samples (docs/distillation.md compares the choices).

Everything random is drawn from generators seeded by the step, so a resumed run sees the
same examples as an uninterrupted one and no RNG state needs saving.
"""
import math
from typing import List, Optional, Sequence

import torch

from .teacher_data import ImageJob, TeacherData
from .losses import Example


def batch(pool: Sequence, phase_index: int, step_in_phase: int, size: int, seed: int) -> List:
    """The items of one optimiser step: consecutive slices of per-epoch permutations seeded
    by (seed, phase, epoch), so the data position is a pure function of the step."""
    n, picked = len(pool), []
    epoch, offset = divmod(step_in_phase * size, n)
    while len(picked) < size:
        g = torch.Generator().manual_seed(seed * 1_000_003 + phase_index * 10_007 + epoch)
        picked += torch.randperm(n, generator=g)[offset:offset + size - len(picked)].tolist()
        epoch, offset = epoch + 1, 0
    return [pool[i] for i in picked]


def layer_subset(layers: Sequence[str], k: int, seed: int, step: int) -> Sequence[str]:
    """``k`` of ``layers`` (in model order) for one step; all when k is 0 or >= len(layers)."""
    if k <= 0 or k >= len(layers):
        return tuple(layers)
    g = torch.Generator().manual_seed(seed * 7_919 + step * 31 + 17)
    chosen = sorted(torch.randperm(len(layers), generator=g)[:k].tolist())
    return tuple(layers[i] for i in chosen)


def starting_noise(shape, seed: int) -> torch.Tensor:
    """The noise KSampler started the image from (comfy.sample.prepare_noise, without
    touching the global RNG)."""
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def make_example(trainer, data: TeacherData, job: ImageJob, seed: int, step: int, slot: int, device,
                 dtype: Optional[torch.dtype] = None, use_negative: bool = True) -> Example:
    """Example ``slot`` of optimiser step ``step`` (slot: its index in the global batch)."""
    image = data.image(job)
    conds = data.conds(job.prompt)
    if image is None or conds is None:
        raise FileNotFoundError(f"teacher data for {job.name} is missing from {data.dir}")
    sigmas = image["sigmas"]
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + slot)
    call = int(torch.randint(len(sigmas), (), generator=g))
    if use_negative and bool(torch.rand((), generator=g) < 0.5):
        conds = data.conds(None) or conds
    t = torch.tensor([float(sigmas[call])])
    stored = (image["calls"] == call).nonzero()
    if len(stored):  # the sampler's own input at this call
        x = image["states"][int(stored[0, 0])].float().unsqueeze(0)
    else:
        ms = trainer.get_model_object("model_sampling")
        x0 = trainer.model.process_latent_in(image["latent"].unsqueeze(0))
        sigma = float(t)
        max_denoise = math.isclose(float(ms.sigma_max), sigma, rel_tol=1e-5) or sigma > float(ms.sigma_max)
        x = ms.noise_scaling(t, starting_noise(image["latent"].shape, job.seed), x0, max_denoise=max_denoise)

    def put(v):
        v = v.to(device)
        return v.to(dtype) if dtype is not None and v.is_floating_point() else v

    return Example(put(x), t.to(device), {k: put(v.unsqueeze(0)) for k, v in conds.items()})
