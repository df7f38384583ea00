"""The benchmark's models: ``edit_core.comfyui.architectures``' SD3.5-Medium and PixArt-Sigma
(ComfyUI's own classes, found by ComfyUI's model detection), cut to a number of blocks at
their real width, or at tiny widths for smoke tests, with random weights drawn on the device."""
import copy
import math

import torch

import comfy.model_management
import comfy.model_patcher

from edit_core.comfyui.architectures import PIXART_SIGMA, SD35_MEDIUM, build_patcher, model_config_from_unet_config

ARCHITECTURES = {"sd35": SD35_MEDIUM, "pixart": PIXART_SIGMA}


def full_depth(family: str) -> int:
    return ARCHITECTURES[family]["depth"]


def unet_config(family: str, depth: int, tiny: bool = False) -> dict:
    """The family's architecture with its first ``depth`` blocks; ``tiny``: the same classes and
    code paths at widths worth nothing as timings (SD3.5: 128 = 2 heads x 64, a 64 x 64 position
    table; PixArt: 64 = 4 heads x 16)."""
    config = copy.deepcopy(ARCHITECTURES[family])
    if family == "pixart":
        config["depth"] = depth
        if tiny:
            config.update(hidden_size=64, num_heads=4)
        return config
    if tiny:  # ComfyUI's MMDiT is 64 * "depth" wide: the width is set there, the blocks by num_blocks
        config.update(depth=2, num_patches=64 ** 2, pos_embed_max_size=64)
        config["context_embedder_config"]["params"]["out_features"] = 128
    config["num_blocks"] = depth  # the last one pre_only, as in the real model
    config["x_block_self_attn_layers"] = [i for i in config["x_block_self_attn_layers"] if i < depth]
    return config


def random_patcher(family: str, depth: int, dtype, tiny: bool = False, seed: int = 0):
    """A ModelPatcher for the load device around the cut model, its weights random."""
    model_config = model_config_from_unet_config(unet_config(family, depth, tiny), f"the {family} benchmark model")
    model = build_patcher(model_config, dtype).model  # CPU, uninitialised: filled below
    model.diffusion_model.to(comfy.model_management.get_torch_device())
    random_weights_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


@torch.no_grad()
def random_weights_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``tiny_models.randomize_``'s distribution (matrices ~ N(0, 1/fan_in), norm scales ~ 1,
    other vectors ~ N(0, 0.02)), drawn where the weights are: seconds for a 2.5B model on a GPU,
    where randomize_'s one CPU generator takes minutes."""
    for i, (name, p) in enumerate(list(module.named_parameters()) + list(module.named_buffers())):
        if not p.is_floating_point():
            continue
        g = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
        v = torch.empty(p.shape, device=p.device, dtype=torch.float32)
        if p.ndim >= 2:
            v.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
        elif any(s in name for s in ("ln_q", "ln_k", "norm")):
            v.normal_(1.0, 0.1, generator=g)
        else:
            v.normal_(0.0, 0.02, generator=g)
        p.copy_(v)
    return module
