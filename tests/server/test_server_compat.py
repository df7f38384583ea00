"""Apply EDiT inside a real ComfyUI server beside core nodes: under TorchCompileModel, and
over several prompts without ComfyUI's memory-leak warning."""
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_graph, tiny_sd35_graph

# TorchCompileModel offers inductor and cudagraphs. On a CPU-only host the cudagraphs backend
# runs Dynamo's capture and AOT autograd and then the captured graph without CUDA graphs: the
# compile path through the node in seconds, where inductor would compile C++ for minutes.
COMPILE_BACKEND = "cudagraphs"


def latent_graph(enabled: bool, seed: int, prefix: str, compile_backend=None):
    """The tiny SD3.5 example, optionally with TorchCompileModel between Apply EDiT and
    KSampler, saving the sampled latent (the tiny VAE's images say little)."""
    graph = tiny_sd35_graph()
    kind = {n["class_type"]: i for i, n in graph.items()}
    apply, sampler = kind["ApplyEDiT"], kind["KSampler"]
    graph[apply]["inputs"]["enabled"] = enabled
    graph[sampler]["inputs"]["seed"] = seed
    if compile_backend:
        graph["90"] = {"class_type": "TorchCompileModel", "inputs": {"model": [apply, 0], "backend": compile_backend}}
        graph[sampler]["inputs"]["model"] = ["90", 0]
    del graph[kind["VAEDecode"]], graph[kind["SaveImage"]]
    graph["91"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": prefix}}
    return graph


def sampled_latent(server, tmp_path, enabled, seed, compile_backend=None):
    prefix = f"edit_{'on' if enabled else 'off'}_{compile_backend or 'eager'}_{seed}"
    result = run_graph(server, latent_graph(enabled, seed, prefix, compile_backend), tmp_path)
    assert result.status == "success", result.message
    [path] = (server.base / "output").glob(f"{prefix}_*.latent")
    return load_file(str(path))["latent_tensor"]


@pytest.mark.slow
def test_apply_edit_then_torch_compile_model_then_ksampler(comfy_server, tmp_path):
    seed = int(time.time()) % 2**31  # a fresh seed: ComfyUI's cache must not answer
    log_before = len(comfy_server.log_tail(10**8))
    compiled = sampled_latent(comfy_server, tmp_path, True, seed, COMPILE_BACKEND)
    eager = sampled_latent(comfy_server, tmp_path, True, seed)
    edit_off = sampled_latent(comfy_server, tmp_path, False, seed)
    assert torch.isfinite(compiled).all()
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-4), (compiled - eager).abs().max()
    assert not torch.allclose(compiled, edit_off, atol=1e-3), "EDiT did not act in the compiled model"
    log = comfy_server.log_tail(10**8)[log_before:]
    assert "EDiT's wrapper did not see" not in log, log[-3000:]


def test_three_prompts_log_no_memory_leak_warning(comfy_server, tmp_path):
    # Apply EDiT runs again for each prompt (its options change) while the loaded bank stays
    # cached: ComfyUI warns when a loaded model's ModelPatcher dies while the model lives on.
    log_before = len(comfy_server.log_tail(10**8))
    graph = tiny_sd35_graph()
    kind = {n["class_type"]: i for i, n in graph.items()}
    first_seed = int(time.time()) % 2**30
    for n, end_percent in enumerate((1.0, 0.9, 0.8)):
        graph[kind["KSampler"]]["inputs"]["seed"] = first_seed + n
        graph[kind["ApplyEDiT"]]["inputs"]["end_percent"] = end_percent
        result = run_graph(comfy_server, graph, tmp_path / str(n))
        assert result.status == "success", result.message
    log = comfy_server.log_tail(10**8)[log_before:]
    assert "memory leak with model EDiTBank" not in log, log[-3000:]
    assert "Potential memory leak detected with model EDiTBank" not in log, log[-3000:]
