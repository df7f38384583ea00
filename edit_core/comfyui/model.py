"""What EDiT can convert in a ComfyUI model: one adapter per family (sd3.py, pixart.py)."""
from typing import Optional

from ..bank import EDiTError, ModelSpec
from . import pixart, sd3
from .family import FamilyAdapter

FAMILIES = {adapter.name: adapter for adapter in (sd3.ADAPTER, pixart.ADAPTER)}


def diffusion_model(patcher):
    return patcher.get_model_object("diffusion_model")


def family_of(dm) -> Optional[FamilyAdapter]:
    """The adapter of the family whose ComfyUI class ``dm`` is, or None."""
    return next((adapter for adapter in FAMILIES.values() if isinstance(dm, adapter.model_class)), None)


def conditioning_dims(patcher):
    """(context width, pooled width or 0) the model expects from its text encoders."""
    dm = diffusion_model(patcher)
    adapter = family_of(dm)
    if adapter is None:
        raise EDiTError(f"no conditioning dims for a {type(dm).__name__} model")
    return adapter.conditioning_dims(dm)


def model_spec(patcher) -> ModelSpec:
    """The ModelSpec of a ComfyUI ModelPatcher, or EDiTError for a model EDiT does not support."""
    dm = diffusion_model(patcher)
    adapter = family_of(dm)
    if adapter is None:
        raise EDiTError(f"EDiT supports SD3/SD3.5 (MMDiT) and PixArt-Sigma/Alpha models; this model is "
                        f"{type(patcher.model).__name__} with a {type(dm).__name__} diffusion model")
    return adapter.model_spec(dm)
