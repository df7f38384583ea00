"""The EDiT attention path compiles with torch.compile(fullgraph=True): no graph breaks.

Small shapes on CPU (inductor needs a C++ compiler, gcc here); each compiled function is
checked against its eager result. Compiled code is not the default path; this keeps the
code compile-friendly for users who wrap the model in torch.compile.
"""
import pytest
import torch

from edit_core.attention import linear_attention, mm_edit_attention
from edit_core.modules import EDiTAttention, HybridEDiTAttention

from test_attention import FP32_TOL, features, mm_inputs, rel_err
from test_modules import randomize

GRID = (6, 5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


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
