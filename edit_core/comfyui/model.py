"""What EDiT can convert in a ComfyUI model (ComfyUI-aware)."""
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
from comfy.ldm.pixart.pixartms import PixArtMS

from ..bank import EDiTError, ModelSpec


def diffusion_model(patcher):
    return patcher.get_model_object("diffusion_model")


def conditioning_dims(patcher):
    """(context width, pooled width or 0) the model expects from its text encoders."""
    dm = diffusion_model(patcher)
    if isinstance(dm, MMDiT):
        pooled = dm.y_embedder.mlp[0].in_features if dm.y_embedder is not None else 0
        return dm.context_embedder.in_features, pooled
    if isinstance(dm, PixArtMS):
        return dm.y_embedder.y_proj.fc1.in_features, 0
    raise EDiTError(f"no conditioning dims for a {type(dm).__name__} model")


def model_spec(patcher) -> ModelSpec:
    """The ModelSpec of a ComfyUI ModelPatcher, or EDiTError for a model EDiT does not support."""
    dm = diffusion_model(patcher)
    if isinstance(dm, MMDiT):
        layers = []
        for i, block in enumerate(dm.joint_blocks):
            layers.append(f"joint_blocks.{i}.attn")
            if block.x_block.x_block_self_attn:
                layers.append(f"joint_blocks.{i}.attn2")
        return ModelSpec("sd3", dm.hidden_size, dm.num_heads, len(dm.joint_blocks), tuple(layers))
    if isinstance(dm, PixArtMS):
        compressed = [i for i, b in enumerate(dm.blocks) if b.attn.sr_ratio > 1]
        if compressed:
            raise EDiTError(f"this PixArt model uses its own KV compression in blocks {compressed}; "
                            "EDiT supports PixArt models with full self-attention")
        return ModelSpec("pixart", dm.hidden_size, dm.num_heads, len(dm.blocks),
                         tuple(f"blocks.{i}.attn" for i in range(len(dm.blocks))))
    raise EDiTError(f"EDiT supports SD3/SD3.5 (MMDiT) and PixArt-Sigma/Alpha models; this model is "
                    f"{type(patcher.model).__name__} with a {type(dm).__name__} diffusion model")
