"""The real SD3.5-Medium and PixArt-Sigma architectures, full depth and width, built through
ComfyUI's own model classes, with random weights or none at all (ComfyUI-aware).

The configs below are what ComfyUI's model detection (``comfy.model_detection``) produces
for the published checkpoints; ``model_config_from_file`` runs that detection on any
checkpoint's header (shapes only, no tensor is read), and ``model_config_of`` takes it from
a loaded model. ``build_patcher`` builds the model with real or fake weights:
with fake ones (``FakeTensorMode``) no weight memory is allocated (a 2.2 B-parameter SD3.5-M builds
in a fraction of a second), which is how the distillation plan measures memory; for real runs
``tiny_models.randomize_`` fills the weights.
"""
import copy
from pathlib import Path

import torch

import comfy.model_detection
import comfy.model_patcher

from ..errors import EDiTError
from ..util.safetensors_io import HeaderError, read_header
from .model import conditioning_dims, model_spec

# SD3.5-Medium (sd3.5_medium.safetensors): 24 joint blocks, hidden 1536 (24 heads x 64), MMDiT-X
# attn2 in blocks 0-12, RMS q/k norm, a 384 x 384 position-embedding table, 16 latent channels.
SD35_MEDIUM = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 24, "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
    "num_patches": 384 * 384, "pos_embed_max_size": 384, "qk_norm": "rms", "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": list(range(13)),
}
# PixArt-Sigma XL-2 1024-MS: 28 blocks, hidden 1152 (16 heads x 72), 4 latent channels, T5-XXL
# context (4096 wide, up to 300 tokens), position embedding for a 128 x 128 latent.
PIXART_SIGMA = {
    "num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4, "depth": 28,
    "model_max_length": 300, "input_size": 128, "pe_interpolation": 2, "image_model": "pixart_sigma",
    "micro_condition": False,
}
KNOWN_MODELS = {"sd35-medium": SD35_MEDIUM, "pixart-sigma": PIXART_SIGMA}
PROMPT_TOKENS = {"sd3": 154, "pixart": 300}  # CLIP-L/G 77 + T5 77; PixArt-Sigma's T5 length


def model_config_from_unet_config(unet_config: dict, source: str):
    model_config = comfy.model_detection.model_config_from_unet_config(copy.deepcopy(unet_config))
    if model_config is None:
        raise EDiTError(f"ComfyUI does not recognise the diffusion model of {source}")
    return model_config


def _header_shapes(path: Path) -> dict:
    """name -> shape from a safetensors header: the file's tensors are not read."""
    try:
        header = read_header(path, max_bytes=100 * 2**20)
    except HeaderError as e:
        raise EDiTError(f"cannot read {path} as a safetensors checkpoint ({e}); "
                        "give a .safetensors diffusion model or full checkpoint")
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def model_config_from_file(path):
    """ComfyUI's model config for a checkpoint, detected from its header the way ComfyUI
    detects it on load (diffusion-model-only files and full checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise EDiTError(f"model file not found: {path}")
    with torch.device("meta"):
        sd = {k: torch.empty(shape, dtype=torch.bfloat16) for k, shape in _header_shapes(path).items()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    if not any(k.startswith(prefix) for k in sd):
        prefix = ""
    unet_config = comfy.model_detection.detect_unet_config(sd, prefix)
    if unet_config is None:
        raise EDiTError(f"{path}: ComfyUI detects no diffusion model in this file")
    return model_config_from_unet_config(unet_config, str(path))


def model_config_of(patcher):
    """A copy of a loaded ComfyUI model's config, to build the same architecture again."""
    model_config = copy.copy(patcher.model.model_config)
    model_config.unet_config = dict(model_config.unet_config)
    return model_config


def model_config_for(name_or_path: str):
    if name_or_path in KNOWN_MODELS:
        return model_config_from_unet_config(KNOWN_MODELS[name_or_path], name_or_path)
    return model_config_from_file(name_or_path)


def build_patcher(model_config, dtype=torch.bfloat16, fake_mode=None):
    """A ComfyUI ModelPatcher (CPU) around a freshly built model of ``model_config`` with
    uninitialised weights in ``dtype``. With ``fake_mode`` (a FakeTensorMode) the weights are
    fake: built on the meta device (model constructors may read values, e.g. PixArt's
    drop-path schedule, which fake tensors cannot give) and then made fake CPU tensors."""
    model_config = copy.copy(model_config)
    model_config.unet_config = dict(model_config.unet_config)
    model_config.set_inference_dtype(dtype, None)
    model_config.custom_operations = None
    model_config.scaled_fp8 = None
    cpu = torch.device("cpu")
    model = model_config.get_model({}, "", device=torch.device("meta") if fake_mode is not None else cpu)
    if fake_mode is not None:
        with fake_mode:
            model.diffusion_model.to_empty(device=cpu)
        model.device = cpu
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def example_inputs(patcher, batch: int, resolution, dtype=torch.bfloat16, sigma: float = 0.5, tokens=None):
    """(x, t, conds) for one model call at ``resolution`` = (width, height) px, random values:
    the latent, the sigma and the conditioning ComfyUI's model class expects."""
    family = model_spec(patcher).family
    channels = patcher.model.latent_format.latent_channels
    w, h = resolution
    tokens = tokens or PROMPT_TOKENS[family]
    x = torch.randn(batch, channels, h // 8, w // 8).to(dtype)
    t = torch.full((batch,), sigma)
    context_dim, pooled_dim = conditioning_dims(patcher)
    conds = {"c_crossattn": torch.randn(batch, tokens, context_dim).to(dtype)}
    if pooled_dim:
        conds["y"] = torch.randn(batch, pooled_dim).to(dtype)
    return x, t, conds

