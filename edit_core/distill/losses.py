"""The student's distillation loss on one cached sample (ComfyUI-aware).

Layer-wise: every converted layer gets the teacher's own inputs to that layer (recomputed
from the cached layer inputs with the model's frozen projections) and learns to reproduce
the teacher's attention output; no backprop through the network. End-to-end: the student
runs the whole model; feature losses on every layer's attention output plus an output loss
on the denoised prediction (plus, optionally, a task loss on user latents).

All losses are relative squared errors, mean((s - t)^2) / mean(t^2), so layers and outputs
of different scales weigh alike.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..bank import EDiTBank, layer_kind
from ..comfy_model import diffusion_model
from ..patcher import STUDENT, call_model, layer_inputs
from .cache import Sample


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s, t = student.float(), teacher.float()
    return (s - t).square().mean() / t.square().mean().clamp_min(1e-12)


class FreshInferenceTensors(TorchFunctionMode):
    """ComfyUI loads models under torch.inference_mode, and autograd cannot save inference
    tensors for backward. Where an op mixes such a tensor (a frozen weight) with one that
    requires grad, hand it a clone, a normal tensor. Outside ComfyUI nodes nothing is cloned."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        flat, spec = tree_flatten((args, kwargs or {}))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and any(t.is_inference() for t in tensors):
            flat = [t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t for t in flat]
            args, kwargs = tree_unflatten(flat, spec)
        return func(*args, **(kwargs or {}))


class StudentLoss(nn.Module):
    """forward(sample, mode) -> (loss, per-part losses). The bank is the only trainable
    module; DDP wraps this so its forward prepares the gradient all-reduce."""

    def __init__(self, bank: EDiTBank, student, feature_weight=1.0, output_weight=1.0, task_weight=0.0):
        super().__init__()
        self.bank = bank
        self.__dict__["student"] = student  # a ComfyUI ModelPatcher: not a submodule
        self.feature_weight, self.output_weight, self.task_weight = feature_weight, output_weight, task_weight

    def forward(self, sample: Sample, mode: str, task: Optional[Tuple] = None):
        if mode == "layerwise":
            return self.layerwise(sample)
        return self.end_to_end(sample, task)

    def layer_output(self, name: str, inputs: Dict[str, torch.Tensor], grid) -> torch.Tensor:
        layer = self.bank.layer(name)
        if layer_kind(self.bank.config.family, name) == "hybrid":
            return layer(inputs["x"], inputs["q_txt"], inputs["k_txt"], inputs["v_txt"], inputs["q"], inputs["k"],
                         inputs["v"], grid, prompt_rows=False)[1]
        return layer(inputs["x"], inputs["q"], inputs["k"], inputs["v"], grid)

    def layer_losses(self, sample: Sample) -> Dict[str, torch.Tensor]:
        """Each layer's error on the teacher's inputs to it."""
        dm = diffusion_model(self.student)
        losses = {}
        for name in self.bank.config.layers:
            with torch.no_grad():
                inputs = layer_inputs(dm, name, sample.layer_inputs(name))
            losses[name] = relative_mse(self.layer_output(name, inputs, sample.grid), sample.reference(name))
        return losses

    def layerwise(self, sample: Sample):
        parts = self.layer_losses(sample)
        return self.feature_weight * torch.stack(list(parts.values())).mean(), parts

    def run_student(self, x, t, conds, sink=None):
        with FreshInferenceTensors():
            return call_model(self.student, x, t, conds, STUDENT, sink)

    def end_to_end(self, sample: Sample, task=None):
        outputs = {}
        out = self.run_student(sample.get("x").unsqueeze(0), sample.get("t").reshape(1), sample.conds(),
                               lambda name, grid, tensors: outputs.__setitem__(name, tensors["out"]))
        parts = {name: relative_mse(outputs[name], sample.reference(name)) for name in self.bank.config.layers}
        parts["output"] = relative_mse(out, sample.get("out").unsqueeze(0))
        loss = (self.feature_weight * torch.stack([parts[n] for n in self.bank.config.layers]).mean()
                + self.output_weight * parts["output"])
        if task is not None and self.task_weight > 0:
            x0, noise, sigma, conds = task
            ms = self.student.get_model_object("model_sampling")
            denoised = self.run_student(ms.noise_scaling(sigma, noise, x0), sigma, conds)
            parts["task"] = relative_mse(denoised, x0)
            loss = loss + self.task_weight * parts["task"]
        return loss, parts
