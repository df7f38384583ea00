"""The model distillation trains through (ComfyUI-aware): one EDiT-patched clone that serves
as teacher (EDiT forced off, no grad) and student, with per-block activation checkpointing,
and weights autograd can use.

- ``trainer_model``: ``apply_edit`` plus an object patch on every block's forward that runs
  it under ``torch.utils.checkpoint`` when gradients are being recorded, so end-to-end
  training keeps one block's activations, not the whole depth's. It wraps whatever the clone
  already has there (EDiT's own block patch, or the original forward).
- ``trainable_weights``: ComfyUI loads models under ``torch.inference_mode``, and autograd may
  not save inference tensors for backward. Each such parameter and buffer is replaced, once
  per run and one at a time, by a normal tensor with the same values: the peak grows by one
  parameter, and no second copy of the weights exists (tests/distill/test_distill_memory.py).
"""
import torch
import torch.utils.checkpoint

from ..bank import EDiTBank
from ..comfyui.model import diffusion_model, family_of
from ..comfyui.patcher import apply_edit, edit_state_of


class CheckpointedBlock:
    """Object patch: run a block's forward under activation checkpointing while grad is on.

    The block is recomputed during backward, after its model call has ended; the recomputation
    runs under that call's EDiT decision again (PixArt's layers read it from the application's
    state, SD3's from the transformer_options the checkpoint keeps), so it takes the same path."""

    def __init__(self, forward, state):
        self.forward = forward
        self.state = state

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        call = self.state.call

        def run(*a, **k):
            with self.state.resumed(call):
                return self.forward(*a, **k)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def trainer_model(model, bank: EDiTBank, checkpoint_blocks: bool = True):
    """A clone of ``model`` with EDiT from ``bank`` and (by default) checkpointed blocks."""
    trainer = apply_edit(model, bank)
    if checkpoint_blocks:
        dm = diffusion_model(trainer)
        for key in family_of(dm).block_keys(dm):
            trainer.add_object_patch(key, CheckpointedBlock(trainer.get_model_object(key), edit_state_of(trainer)))
    return trainer


@torch.inference_mode(False)
def trainable_weights(module: torch.nn.Module) -> int:
    """Replace every inference-mode parameter and buffer of ``module`` by a normal tensor with
    the same values, one at a time. Returns how many were replaced (0 outside ComfyUI nodes)."""
    replaced = 0
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name in list(table):  # names only: the old tensor is freed as soon as it is replaced
                t = table[name]
                if t is not None and t.is_inference():
                    fresh = t.clone()
                    table[name] = torch.nn.Parameter(fresh, requires_grad=t.requires_grad) \
                        if isinstance(t, torch.nn.Parameter) else fresh
                    replaced += 1
                del t
    return replaced
