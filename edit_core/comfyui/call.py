"""What EDiT's wrapper and the families' layer patches share: one model call's EDiT decision
(``EditCall``), an application's per-call state (``EditState``) and what a bank layer reads."""
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

TEACHER, STUDENT = "teacher", "student"
CALL_KEY = "edit_call"  # transformer_options key of the running EditCall

# sink(layer_name, grid, tensors): receives every converted layer's inputs and attention
# output during a call that asked for it (distillation). Tensors: the layer's inputs (SD3:
# the block inputs x, context, c; PixArt: the attention input x; ``layer_inputs`` turns
# them into q, k, v) and out, the image rows of the attention output (teacher's or
# student's, as the call ran).
CaptureSink = Callable[[str, Tuple[int, int], Dict[str, torch.Tensor]], None]


@dataclass(frozen=True)
class EditCall:
    """One model call's EDiT decision, made by the wrapper of the application ``owner``."""
    owner: "EditState"
    student: bool
    grid: Tuple[int, int]
    sink: Optional[CaptureSink] = None

    @property
    def active(self) -> bool:
        """Whether the patched layers do anything but call the original (EDiT or capture)."""
        return self.student or self.sink is not None


class EditState:
    """One Apply EDiT's per-call state: the running call, set by its wrapper for the length
    of that call (PixArt's layers cannot receive transformer_options), and whether the
    layers have warned about a call the wrapper did not see."""

    def __init__(self):
        self.call: Optional[EditCall] = None
        self.warned = False

    @contextmanager
    def running(self, student: bool, grid: Tuple[int, int], sink: Optional[CaptureSink] = None,
                transformer_options: Optional[dict] = None):
        """Run the EDiT (student) or original (teacher) path in this application's patched
        layers called inside; yields the transformer_options (a copy) to call them with."""
        call = EditCall(self, student, grid, sink)
        previous, self.call = self.call, call
        try:
            yield dict(transformer_options or {}, **{CALL_KEY: call})
        finally:
            self.call = previous

    @contextmanager
    def resumed(self, call: Optional[EditCall]):
        """Run the patched layers under an earlier call's decision again: activation
        checkpointing recomputes a block during backward, after its call has ended."""
        previous, self.call = self.call, call
        try:
            yield
        finally:
            self.call = previous

    def unseen(self, layer: str):
        """A patched layer ran in a call this application's wrapper did not see: it runs the
        original attention; say so once per model."""
        if not self.warned:
            self.warned = True
            logging.warning(f"EDiT: {layer} ran in a model call that EDiT's wrapper did not see (the model was "
                            "called without its patcher's wrappers, e.g. model.apply_model without "
                            "transformer_options['wrappers']); the original attention runs for such calls. "
                            "Call it through a sampler or edit_core.comfyui.patcher.call_model.")


def edit_layer_args(cf_input: str, x, h):
    """(ConvFusion's input, the qkv update's input) of a layer whose bank reads ConvFusion from
    ``cf_input``: x is the block's residual stream (SD3) or the attention input (PixArt), h
    the modulated attention input (None where nothing reads it)."""
    return (h if cf_input == "modulated" else x), h
