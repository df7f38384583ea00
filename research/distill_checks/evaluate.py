"""How close a student is to its teacher, and how peaked the teacher's attention is."""
import math
from statistics import mean
from typing import Dict, List, Tuple

import torch

from edit_core.bank import EDiTBank, init_bank
from edit_core.comfyui.model import diffusion_model, model_spec
from edit_core.attention.layers import split_heads
from edit_core.comfyui.patcher import apply_edit, layer_inputs
from edit_core.distill.teacher_data import ImageJob
from edit_core.distill.trajectories import sample, teacher_sample


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@torch.no_grad()
def final_latent_errors(model, bank: EDiTBank, positive: List, negative, seeds, resolution: Tuple[int, int],
                        sampler="euler", scheduler="simple", steps=20, cfg=4.0) -> List[float]:
    """Relative L2 error of the student's final latent against the teacher's, per prompt x seed
    (same noise, same sampler): the fidelity that matters after a whole trajectory."""
    student = apply_edit(model, bank)
    errors = []
    for cond in positive:
        for seed in seeds:
            args = (negative, resolution[0], resolution[1], seed, sampler, scheduler, steps, cfg)
            errors.append(relative_l2(sample(student, cond, *args), sample(model, cond, *args)))
    return errors


@torch.no_grad()
def attention_entropy(model, positive, negative, resolution, seed=0, steps=4, cfg=4.0) -> Dict[str, float]:
    """Mean entropy of the teacher's softmax attention rows over image queries, per converted
    layer, as a fraction of uniform attention's log(keys), over every call of a short
    sampling run. Explicit N x N: small models only."""
    spec = model_spec(model)
    student = apply_edit(model, init_bank(spec))
    dm = diffusion_model(model)
    totals = {name: [] for name in spec.layers}

    def sink(name, grid, tensors):
        inputs = layer_inputs(dm, name, tensors)
        q, k = split_heads(inputs["q"], spec.heads), split_heads(inputs["k"], spec.heads)
        if "k_txt" in inputs:
            k = torch.cat((split_heads(inputs["k_txt"], spec.heads), k), dim=-2)
        p = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
        totals[name].append(float(entropy) / math.log(k.shape[-2]))

    teacher_sample(student, positive, negative, ImageJob(tuple(resolution), 0, seed), "euler", "simple", steps, cfg,
                   capture=sink)
    return {name: mean(v) for name, v in totals.items()}
