"""Helpers for tests on real ComfyUI models built small: run them the way sampling does."""
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

from edit_core.patcher import model_call_options
from edit_core.tiny_models import SD3_CONTEXT_DIM, SD3_POOLED_DIM, randomize_


# The student design of the banks made before issue 11's default switch (what a file without
# the optional hparams means): for tests about that design, passed to init_bank explicitly.
LEGACY_DESIGN = {"sc_kernel": 3, "sc_stride": 2, "qkv_rank": 0}


def sd3_inputs(batch=2, latent_hw=(25, 39), tokens=10, sigma=0.7):
    return dict(x=torch.randn(batch, 16, *latent_hw), t=torch.full((batch,), sigma),
                c_crossattn=torch.randn(batch, tokens, SD3_CONTEXT_DIM), y=torch.randn(batch, SD3_POOLED_DIM))


def pixart_inputs(batch=2, latent_hw=(34, 50), tokens=12, sigma=5.0):
    return dict(x=torch.randn(batch, 4, *latent_hw), t=torch.full((batch,), sigma),
                c_crossattn=torch.randn(batch, tokens, 4096))


@torch.no_grad()
def run(patcher, inputs, **transformer_options):
    """Load the patcher as sampling does (object patches applied, additional models loaded)
    and call apply_model once with its wrappers, as a sampler does."""
    comfy.model_management.load_models_gpu([patcher] + patcher.get_nested_additional_models())
    return patcher.model.apply_model(inputs["x"], inputs["t"], c_crossattn=inputs["c_crossattn"], y=inputs.get("y"),
                                     transformer_options=model_call_options(patcher, **transformer_options))


def randomized_bank(bank, seed=0, scale=0.2):
    """A bank with every parameter random: an untrained bank's zero ConvFusion tests nothing."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in bank.parameters():
                p.copy_(torch.randn_like(p) * scale)
    return bank


def sd15_patcher():
    """A small SD1.5 UNet (ComfyUI's classes): a model EDiT does not support."""
    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
           "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
           "use_linear_in_transformer": False, "context_dim": 64, "num_heads": 2, "num_head_channels": -1,
           "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False}
    mc = comfy.supported_models.SD15(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = randomize_(mc.get_model({}, ""), 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
