"""Apply EDiT inside a real ComfyUI server beside core nodes: under TorchCompileModel, and
over several prompts without ComfyUI's memory-leak warning."""
import time

import numpy as np
from PIL import Image

from test_server import run_graph, tiny_sd35_graph

# TorchCompileModel offers inductor and cudagraphs. On a CPU-only host the cudagraphs backend
# runs Dynamo's capture and AOT autograd and then the captured graph without CUDA graphs: the
# compile path through the node in seconds, where inductor would compile C++ for minutes.
COMPILE_BACKEND = "cudagraphs"


def compiled_graph(enabled: bool, seed: int):
    graph = tiny_sd35_graph()
    [apply] = [i for i, n in graph.items() if n["class_type"] == "ApplyEDiT"]
    [sampler] = [i for i, n in graph.items() if n["class_type"] == "KSampler"]
    graph[apply]["inputs"]["enabled"] = enabled
    graph["90"] = {"class_type": "TorchCompileModel", "inputs": {"model": [apply, 0], "backend": COMPILE_BACKEND}}
    graph[sampler]["inputs"].update(model=["90", 0], seed=seed)
    return graph


def pixels(result):
    [image] = result.files  # downloaded by the batch client
    return np.asarray(Image.open(image))


def test_apply_edit_then_torch_compile_model_then_ksampler(comfy_server, tmp_path):
    seed = int(time.time()) % 2**31  # a fresh seed: ComfyUI's cache must not answer
    log_before = len(comfy_server.log_tail(10**8))
    on = run_graph(comfy_server, compiled_graph(True, seed), tmp_path / "on")
    off = run_graph(comfy_server, compiled_graph(False, seed), tmp_path / "off")
    assert on.status == "success", on.message
    assert off.status == "success", off.message
    assert not np.array_equal(pixels(on), pixels(off)), "EDiT did not act when compiled"
    log = comfy_server.log_tail(10**8)[log_before:]
    assert "EDiT's wrapper did not see" not in log, log[-3000:]


def test_three_prompts_log_no_memory_leak_warning(comfy_server, tmp_path):
    log_before = len(comfy_server.log_tail(10**8))
    graph = tiny_sd35_graph()
    [sampler] = [i for i, n in graph.items() if n["class_type"] == "KSampler"]
    first_seed = int(time.time()) % 2**30
    for n in range(3):
        graph[sampler]["inputs"]["seed"] = first_seed + n
        result = run_graph(comfy_server, graph, tmp_path / str(n))
        assert result.status == "success", result.message
    log = comfy_server.log_tail(10**8)[log_before:]
    assert "memory leak with model EDiTBank" not in log, log[-3000:]
    assert "Potential memory leak detected with model EDiTBank" not in log, log[-3000:]
