"""Helpers shared by the tests: tolerances and random inputs for the attention math, real
ComfyUI models built small and run as sampling runs them, hostile bank files, graphs for the
real server, and the check that a saved image is a real picture."""
import asyncio
import importlib.util
import sys
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

from edit_core.bank import ModelSpec, init_bank, save_bank
from edit_core.client.batch import Job, run_batch
from edit_core.client.tiny_workflow import use_tiny_models
from edit_core.client.workflow import load_graph
from edit_core.comfyui.patcher import model_call_options
from edit_core.fixtures.tiny_models import SD3_CONTEXT_DIM, SD3_POOLED_DIM, randomize_

REPO = Path(__file__).resolve().parents[1]
# The ComfyUI host this run imported (conftest.py puts it on sys.path).
COMFYUI_DIR = Path(comfy.model_management.__file__).resolve().parents[1]


# The original student design (what a bank file without the optional hparams means), passed to
# init_bank explicitly by tests about that design.
ORIGINAL_DESIGN = {"sc_kernel": 3, "sc_stride": 2, "qkv_rank": 0}


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


# Norm-wise relative error: max |fast - ref| / max |ref| (absolute where ref is all zero).
# Measured maxima over 40 seeds: fp32 4.3e-7; linear_attention fp16 4.8e-4, bf16 3.8e-3;
# mm_edit_attention fp16 1.3e-3, bf16 9.1e-3 (references use the same rounded inputs).
FP32_TOL = 1e-4


def rel_err(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def features(*shape, dtype=torch.float32):
    return torch.relu(torch.randn(*shape)).to(dtype)


def mm_inputs(b, h, nt, ni, m, d, dtype=torch.float32):
    txt = [torch.randn(b, h, nt, d).to(dtype) for _ in range(3)]
    img = [torch.randn(b, h, ni, d).to(dtype) for _ in range(3)]
    lin = [features(b, h, ni, d, dtype=dtype), features(b, h, m, d, dtype=dtype), torch.randn(b, h, m, d).to(dtype)]
    return txt + img + lin


# A whole layer in fp16/bf16 (convolutions and GroupNorm too) against float64 from the same
# rounded inputs. Measured maxima over 40 seeds: fp16 3.0e-3, bf16 1.8e-2.
LAYER_LOW_PRECISION_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def randomize(module, scale=0.5):
    """Replace every parameter with random values (zero-initialised branches test nothing)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module


# Small real banks whose metadata claims a huge model. Building the claimed bank would take
# gigabytes (6.8 GB under a 10 GB cap for the first, 60 GB without one).
SPEC = ModelSpec("sd3", 128, 2, 2, ("joint_blocks.0.attn", "joint_blocks.0.attn2", "joint_blocks.1.attn"))


def sd3_layers(depth):
    return [f"joint_blocks.{i}.{a}" for i in range(depth) for a in ("attn", "attn2")]


BOMBS = {
    "200-layers": dict(family="pixart", depth="200", layers=[f"blocks.{i}.attn" for i in range(200)],
                       hidden_size="1152", heads="16"),
    "hidden-16384": dict(hidden_size="16384", heads="128"),
    "64-blocks-hidden-16384": dict(depth="64", layers=sd3_layers(64), hidden_size="16384", heads="128"),
}


def write_bomb(path: Path, claim: dict) -> Path:
    save_bank(init_bank(SPEC), path)
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    meta.update({k: json.dumps(v) if isinstance(v, list) else v for k, v in claim.items()})
    save_file(tensors, str(path), meta)
    return path


def pack_mappings():
    """The pack's NODE_CLASS_MAPPINGS, imported as ComfyUI imports a custom node (a package)."""
    name = "comfyui_edit_pack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].NODE_CLASS_MAPPINGS, sys.modules[name].NODE_DISPLAY_NAME_MAPPINGS


def run_graph(server, graph, out, timeout=600):
    """Submit one graph with the batch CLI's client; returns its Result."""
    [result] = asyncio.run(run_batch(graph, [Job(0, None, None, None, None)], [server.url], out, timeout,
                                     warmup=False, log=lambda s: None))
    return result


def tiny_sd35_graph():
    return use_tiny_models(load_graph(REPO / "workflows" / "api" / "sd35_medium_edit.json"), size=256, steps=2)


def distill_graph(train_steps):
    graph = use_tiny_models(load_graph(REPO / "workflows" / "api" / "sd35_distill_edit.json"), size=256, steps=2)
    [distill] = [i for i, n in graph.items() if n["class_type"] == "EDiTDistill"]
    # A fresh seed: a new run, not one a previous session left a checkpoint for.
    graph[distill]["inputs"].update(train_steps=train_steps, seed=int(time.time() * 1000) % 2**31)
    return graph, distill


# Generous: a loaded 2-core machine runs the tiny distillation slowly. The server's own
# liveness is what the batch client watches; no test here races a clock.
DISTILL_TIMEOUT = 3600


def assert_real_image(path) -> np.ndarray:
    """The image as floats in [0, 1], after checking it is neither black nor one flat colour."""
    path = Path(path)
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    mean, std = float(pixels.mean()), float(pixels.std())
    assert 0.05 < mean < 0.95 and std > 0.03, f"{path.name}: mean {mean:.3f}, std {std:.3f}"
    return pixels
