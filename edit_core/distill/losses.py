"""One training example: the teacher runs online, the student learns from its features in the
same step (ComfyUI-aware).

An ``Example`` is a model input: a latent already noised to sigma ``t``, and the
conditioning the model takes. ``train_example`` runs the teacher (EDiT off, no grad) on it
with a capture sink and accumulates the student's weighted gradients into the bank's
``.grad``; the optimiser step is the caller's.

- Layer-wise: inside the sink, each converted layer's student attention runs on the
  teacher's own inputs to that layer (q, k, v recomputed with the model's frozen
  projections), its loss against the teacher's attention output is backpropagated into the
  bank at once, and the layer's tensors are dropped: beyond the teacher forward, one layer's
  inputs are alive at a time. With a layer subset the teacher stops after its last layer.
- End-to-end: the teacher forward keeps only the converted layers' attention outputs; then
  the student runs the whole model (blocks checkpointed, see student.py) with feature losses
  on every layer's attention output plus an output loss on the denoised prediction. Beyond
  one block's activations, two N x C tensors per converted layer are alive (the teacher's
  and the student's attention outputs).

All losses are relative squared errors, mean((s - t)^2) / mean(t^2), so layers and outputs
of different scales weigh alike.
"""
from dataclasses import dataclass
from typing import Collection, Dict, Optional

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from ..bank import EDiTBank, layer_kind
from ..comfyui.model import diffusion_model
from ..comfyui.call import edit_layer_args
from ..comfyui.patcher import STUDENT, TEACHER, call_model, layer_inputs


@dataclass
class Example:
    x: torch.Tensor                  # model input latent (B, C, h, w), already noised to t
    t: torch.Tensor                  # sigma (B,)
    conds: Dict[str, torch.Tensor]   # what the model takes besides x, t: c_crossattn, y, ...


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s, t = student.float(), teacher.float()
    return (s - t).square().mean() / t.square().mean().clamp_min(1e-12)


class _TeacherDone(Exception):
    """Raised in the sink after the last layer a layer-wise step needs: stops the teacher."""


class StudentLoss(nn.Module):
    """The bank (the only trainable module) and the model it trains through (``trainer``:
    student.trainer_model, a ComfyUI ModelPatcher, loaded)."""

    def __init__(self, bank: EDiTBank, trainer, feature_weight=1.0, output_weight=1.0, task_weight=0.0):
        super().__init__()
        self.bank = bank
        self.trainer = trainer  # a ComfyUI ModelPatcher (no nn.Module, so not a submodule)
        self.feature_weight, self.output_weight, self.task_weight = feature_weight, output_weight, task_weight

    def layer_output(self, name: str, inputs: Dict[str, torch.Tensor], grid) -> torch.Tensor:
        layer = self.bank.layer(name)
        x, h = edit_layer_args(self.bank.config.cf_input, inputs["x"], inputs["h"])  # as the patched model reads
        if layer_kind(self.bank.config.family, name) == "hybrid":
            return layer(x, inputs["q_txt"], inputs["k_txt"], inputs["v_txt"], inputs["q"], inputs["k"],
                         inputs["v"], grid, prompt_rows=False, h=h)[1]
        return layer(x, inputs["q"], inputs["k"], inputs["v"], grid, h=h)

    def layer_loss(self, name: str, tensors: Dict[str, torch.Tensor], grid) -> torch.Tensor:
        """A layer's loss on the teacher's inputs to it (``tensors``: what the sink got)."""
        with torch.no_grad():
            config = self.bank.config
            inputs = layer_inputs(diffusion_model(self.trainer), name, tensors,
                                  modulated=config.cf_input == "modulated" or config.qkv_rank > 0)
        return relative_mse(self.layer_output(name, inputs, grid), tensors["out"])

    def layerwise(self, example: Example, weight: float, layers: Collection[str], backward: bool = True):
        parts: Dict[str, torch.Tensor] = {}
        scale = weight * self.feature_weight / len(layers)

        def sink(name, grid, tensors):
            if name not in layers:
                return
            with torch.enable_grad() if backward else torch.no_grad():
                loss = self.layer_loss(name, tensors, grid)
                if backward:
                    (loss * scale).backward()
            parts[name] = loss.detach()
            del loss, tensors  # the layer's graph and inputs go now
            if len(parts) == len(layers):
                raise _TeacherDone

        with torch.no_grad():
            try:
                call_model(self.trainer, example.x, example.t, example.conds, TEACHER, sink)
            except _TeacherDone:
                pass
        missing = [n for n in layers if n not in parts]
        if missing:
            raise RuntimeError(f"the teacher forward never reached layers {missing}")
        parts = {n: parts[n] for n in layers}
        return dict(parts, loss=self.feature_weight * torch.stack(list(parts.values())).mean())

    def end_to_end(self, example: Example, weight: float, layers: Collection[str]):
        targets: Dict[str, torch.Tensor] = {}

        def teacher_sink(name, grid, tensors):
            if name in layers:
                targets[name] = tensors["out"]

        with torch.no_grad():
            target = call_model(self.trainer, example.x, example.t, example.conds, TEACHER, teacher_sink)
        outputs: Dict[str, torch.Tensor] = {}

        def student_sink(name, grid, tensors):
            # Only a reference: an op here would run inside a checkpointed block and change
            # what it saves. The block calls the sink again when it is recomputed in backward.
            if name in targets and name not in outputs:
                outputs[name] = tensors["out"]

        with torch.enable_grad():
            out = call_model(self.trainer, example.x, example.t, example.conds, STUDENT, student_sink)
            parts = {name: relative_mse(outputs.pop(name), targets.pop(name)) for name in layers}
            parts["output"] = relative_mse(out, target)
            del out, target
            loss = (self.feature_weight * torch.stack([parts[n] for n in layers]).mean()
                    + self.output_weight * parts["output"])
            (loss * weight).backward()
        return dict({k: v.detach() for k, v in parts.items()}, loss=loss.detach())

    def task(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, conds, weight: float):
        """The task loss: the student's denoised prediction of a user latent ``x0``."""
        ms = self.trainer.get_model_object("model_sampling")
        with torch.enable_grad():
            denoised = call_model(self.trainer, ms.noise_scaling(sigma, noise, x0), sigma, conds, STUDENT)
            loss = relative_mse(denoised, x0)
            (loss * weight * self.task_weight).backward()
        return loss.detach()


def _value(t: torch.Tensor) -> float:
    """A loss as a float; NaN under FakeTensorMode (memory planning computes no values)."""
    return float("nan") if isinstance(t, FakeTensor) else float(t)


def train_example(loss_fn: StudentLoss, example: Example, mode: str, weight: float = 1.0,
                  layers: Optional[Collection[str]] = None) -> Dict[str, float]:
    """Teacher forward + student loss for one example in ``mode`` ("layerwise" or "e2e"),
    gradients times ``weight`` accumulated into the bank's ``.grad``. ``layers``: a subset of
    the bank's layers (default: all). Returns the losses: "loss" and one per layer (and
    "output" end-to-end)."""
    layers = tuple(loss_fn.bank.config.layers) if layers is None else tuple(layers)
    if mode == "layerwise":
        parts = loss_fn.layerwise(example, weight, layers)
    elif mode == "e2e":
        parts = loss_fn.end_to_end(example, weight, layers)
    else:
        raise ValueError(f"mode must be 'layerwise' or 'e2e', got {mode!r}")
    return {k: _value(v) for k, v in parts.items()}


@torch.no_grad()
def layer_errors(loss_fn: StudentLoss, examples) -> Dict[str, float]:
    """Each converted layer's relative error on the teacher's inputs, averaged over ``examples``."""
    totals: Dict[str, float] = {}
    layers = tuple(loss_fn.bank.config.layers)
    for example in examples:
        parts = loss_fn.layerwise(example, 1.0, layers, backward=False)
        for name in layers:
            totals[name] = totals.get(name, 0.0) + _value(parts[name]) / len(examples)
    return totals
