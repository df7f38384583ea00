"""EDiT compiles with torch.compile(fullgraph=True): no graph breaks.

The attention math and modules on their own, and whole EDiT-patched ComfyUI models compiled
through ComfyUI's compile-node code path. Small shapes on CPU (inductor needs a C++
compiler, gcc here); each compiled result is checked against eager.
"""
import pytest
import torch
from torch._dynamo.utils import counters

import comfy.ldm.modules.attention as comfy_attention
import comfy.sample
import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
import comfy.ldm.pixart.blocks as pixart_blocks
from comfy_api.torch_helpers import set_torch_compile_wrapper

from edit_core.fixtures import tiny_models
from edit_core.attention.functional import linear_attention, mm_edit_attention
from edit_core.bank import init_bank
from edit_core.comfyui.model import model_spec
from edit_core.attention.layers import EDiTAttention, HybridEDiTAttention
from edit_core.comfyui.patcher import STUDENT, TEACHER, EditOptions, apply_edit
from helpers import FP32_TOL, features, mm_inputs, pixart_inputs, randomize, randomized_bank, rel_err, run, sd3_inputs

GRID = (6, 5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
def test_linear_attention_compiles(batch):
    q, k, v = features(batch, 2, 30, 16), features(batch, 2, 9, 16), torch.randn(batch, 2, 9, 16)
    assert rel_err(compiled(linear_attention)(q, k, v), linear_attention(q, k, v).double()) < FP32_TOL


def test_mm_edit_attention_compiles():
    inputs = mm_inputs(2, 2, 7, 30, 9, 16)
    eta = torch.rand(2, 2, 1, 1)
    out = compiled(mm_edit_attention)(*inputs, eta=eta)
    ref = mm_edit_attention(*inputs, eta=eta)
    assert all(rel_err(o, r.double()) < FP32_TOL for o, r in zip(out, ref))


def token_inputs(batch, n, c, prompt=0):
    # q, k, v as the models hand them over: q dense, k dense, v a strided view of a fused qkv.
    x, q, k = (torch.randn(batch, n, c) for _ in range(3))
    v = torch.randn(batch, n, 3 * c)[..., 2 * c:]
    txt = [torch.randn(batch, prompt, c) for _ in range(3)]
    return x, q, k, v, txt


@pytest.mark.parametrize("batch", [1, 2])
def test_edit_attention_compiles(batch):
    layer = randomize(EDiTAttention(32, 2, reduction=4), scale=0.3)
    x, q, k, v, _ = token_inputs(batch, GRID[0] * GRID[1], 32)
    with torch.no_grad():
        out = compiled(layer)(x, q, k, v, GRID)
        assert rel_err(out, layer(x, q, k, v, GRID).double()) < FP32_TOL


@pytest.mark.parametrize("prompt_rows", [True, False])
def test_hybrid_edit_attention_compiles(prompt_rows):
    layer = randomize(HybridEDiTAttention(32, 2, reduction=4), scale=0.3)
    x, q, k, v, txt = token_inputs(2, GRID[0] * GRID[1], 32, prompt=7)
    with torch.no_grad():
        out = compiled(layer)(x, *txt, q, k, v, GRID, prompt_rows=prompt_rows)
        ref = layer(x, *txt, q, k, v, GRID, prompt_rows=prompt_rows)
    assert rel_err(out[1], ref[1].double()) < FP32_TOL
    assert (out[0] is None) == (not prompt_rows)
    if prompt_rows:
        assert rel_err(out[0], ref[0].double()) < FP32_TOL


# -- whole patched ComfyUI models, compiled the way ComfyUI's TorchCompileModel node does ------

@pytest.fixture
def pytorch_attention(monkeypatch):
    """ComfyUI's PyTorch attention (its default on CUDA) for core's own attention calls. On a
    CPU ComfyUI picks sub-quadratic attention, which reads the free memory through psutil:
    a graph break in core's code, not in the patch."""
    for module in (comfy_attention, mmdit, pixart_blocks):
        monkeypatch.setattr(module, "optimized_attention", comfy_attention.attention_pytorch)


def tiny_model(family):
    """(model, random bank, inputs); SD3.5: an MMDiT-X block (joint attention + attn2) and the
    pre_only last block."""
    if family == "sd35":
        base = tiny_models.sd3_patcher(depth=2, mmditx_layers=(0,), qk_norm=True, seed=4)
        inputs = sd3_inputs(batch=2, latent_hw=(16, 16), tokens=8)
    else:
        base = tiny_models.pixart_patcher(hidden=64, heads=2, depth=2, seed=5)
        inputs = pixart_inputs(batch=2, latent_hw=(34, 40), tokens=8)
    return base, randomized_bank(init_bank(model_spec(base))), inputs


def patched_tiny_model(family):
    base, bank, inputs = tiny_model(family)
    return apply_edit(base, bank), inputs


def compiled_clone(patcher, backend):
    """A clone compiled by ComfyUI's own compile-node code path (an APPLY_MODEL wrapper that
    swaps in the compiled diffusion model), with fullgraph=True: any graph break raises."""
    m = patcher.clone()
    set_torch_compile_wrapper(m, backend=backend, fullgraph=True, dynamic=False)
    return m


def sample(patcher, family, seed, steps=3):
    """A short CFG run with ComfyUI's sampler: the transformer_options every step gets."""
    g = torch.Generator().manual_seed(seed)
    extra = (lambda: {"pooled_output": torch.randn(1, 2048, generator=g)}) if family == "sd35" else dict
    pos, neg = ([[torch.randn(1, 8, 4096, generator=g), extra()]] for _ in range(2))
    latent = torch.zeros(1, 16, 16, 16) if family == "sd35" else torch.zeros(1, 4, 34, 40)
    noise = torch.randn(latent.shape, generator=g)
    return comfy.sample.sample(patcher, noise, steps, 4.0, "euler", "simple", pos, neg, latent, seed=seed)


@pytest.mark.parametrize("family", ["sd35", "pixart"])
def test_patched_model_compiles_whole_without_graph_breaks(family, pytorch_attention):
    patched, inputs = patched_tiny_model(family)
    eager = {mode: run(patched, inputs, edit_mode=mode) for mode in (TEACHER, STUDENT)}
    eager_sampled = sample(patched, family, seed=0)
    compiled = compiled_clone(patched, "eager")  # Dynamo's capture alone: fast; inductor below
    counters.clear()
    for mode in (TEACHER, STUDENT, STUDENT):
        assert torch.equal(run(compiled, inputs, edit_mode=mode), eager[mode])
    assert counters["stats"]["unique_graphs"] == 2  # one per mode, no recompilation
    assert torch.equal(sample(compiled, family, seed=0), eager_sampled)
    graphs = counters["stats"]["unique_graphs"]
    sample(compiled, family, seed=1)  # another run: new prompts, noise, sigmas, cond uuids
    assert counters["stats"]["unique_graphs"] == graphs
    assert dict(counters["graph_break"]) == {}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd35", "pixart"])
def test_patched_model_under_inductor_matches_eager(family, pytorch_attention):
    patched, inputs = patched_tiny_model(family)
    eager = run(patched, inputs)
    out = run(compiled_clone(patched, "inductor"), inputs)
    assert rel_err(out, eager.double()) < FP32_TOL


@pytest.mark.parametrize("family", ["sd35", "pixart"])
def test_compiled_edit_layers_option(family, pytorch_attention):
    base, bank, inputs = tiny_model(family)
    eager = run(apply_edit(base, bank), inputs)
    counters.clear()
    options = EditOptions(compile_backend="eager")  # Dynamo's capture; the GPU benchmark measures inductor
    assert torch.equal(run(apply_edit(base, bank, options), inputs), eager)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert torch.equal(run(apply_edit(base, bank, options), inputs), eager)  # the bank's compiled layers again
    assert counters["stats"]["unique_graphs"] == graphs
    assert dict(counters["graph_break"]) == {}
