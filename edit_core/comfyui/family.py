"""What a family module (sd3.py, pixart.py) declares about its ComfyUI diffusion models;
``model.FAMILIES`` lists one ``FamilyAdapter`` per family."""
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

from ..bank import ModelSpec


@dataclass(frozen=True)
class FamilyAdapter:
    name: str  # the family's spelling in ModelSpec and bank configs
    model_class: type  # ComfyUI's diffusion-model class of the family
    patch_type: type  # the object patch it puts on a converted layer (it keeps ``.original``)
    model_spec: Callable[[object], ModelSpec]  # diffusion model -> ModelSpec (EDiTError if unsupported)
    conditioning_dims: Callable[[object], Tuple[int, int]]  # diffusion model -> (context width, pooled width or 0)
    token_grid: Callable[[Tuple[int, int]], Tuple[int, int]]  # latent (h, w) -> image token grid
    # (diffusion model, layer(name) -> bank layer or None, bank config, EditState, original(key))
    # -> {object patch key: patch}
    layer_patches: Callable[..., Dict[str, object]]
    # (diffusion model, layer name, captured inputs, modulated) -> x, h, q, k, v (, q/k/v_txt)
    layer_inputs: Callable[..., Dict[str, object]]
    block_keys: Callable[[object], List[str]]  # diffusion model -> object keys of its blocks' forwards
