"""The read-outs of functional.py (linear attention, the MM-EDiT image-row mix) against float64 references."""
import math

import pytest
import torch

from edit_core.attention.functional import (add_linear_attention, linear_attention, linear_attention_state,
                                            mix_image_rows, mm_edit_attention)
from edit_core.attention.reference import linear_attention_ref, mm_edit_attention_ref, softmax_attention_ref
from helpers import FP32_TOL, features, mm_inputs, rel_err

LOW_PRECISION_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


LINEAR_SHAPES = [  # B, H, N, M, D
    (1, 1, 1, 1, 1),
    (2, 3, 17, 5, 8),
    (3, 2, 64, 16, 64),
    (1, 4, 129, 33, 72),
]


@pytest.mark.parametrize("b,h,n,m,d", LINEAR_SHAPES)
def test_linear_attention_matches_reference_fp32(b, h, n, m, d):
    q, k, v = features(b, h, n, d), features(b, h, m, d), torch.randn(b, h, m, d)
    out = linear_attention(q, k, v)
    assert out.shape == (b, h, n, d) and out.dtype == torch.float32
    assert rel_err(out, linear_attention_ref(q, k, v)) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,n,m,d", LINEAR_SHAPES[1:])
def test_linear_attention_low_precision(b, h, n, m, d, dtype):
    q, k, v = features(b, h, n, d, dtype=dtype), features(b, h, m, d, dtype=dtype), torch.randn(b, h, m, d).to(dtype)
    out = linear_attention(q, k, v)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, linear_attention_ref(q, k, v)) < LOW_PRECISION_TOL[dtype]


def test_linear_attention_state_does_not_overflow_in_fp16():
    # 4096 keys of value ~30: the fp16 state sum (~1.2e5 per entry) would overflow fp16's 65504.
    q = torch.ones(1, 1, 4, 8, dtype=torch.float16)
    k = torch.ones(1, 1, 4096, 8, dtype=torch.float16)
    v = torch.full((1, 1, 4096, 8), 30.0, dtype=torch.float16)
    out = linear_attention(q, k, v)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), torch.full_like(out.float(), 30.0), rtol=1e-3)


def test_linear_attention_zero_query_gives_zero_not_nan():
    q = torch.zeros(1, 1, 3, 4)
    out = linear_attention(q, features(1, 1, 5, 4), torch.randn(1, 1, 5, 4))
    assert torch.equal(out, torch.zeros_like(out))


def test_linear_attention_memory_is_linear_at_131072_tokens():
    # An N x N float32 similarity at this size is 64 GiB: more than this machine has.
    n, d = 131072, 64
    q, k, v = features(1, 1, n, d), features(1, 1, n, d), torch.randn(1, 1, n, d)
    out = linear_attention(q, k, v)
    rows = torch.randint(0, n, (8,))
    sim = q[0, 0, rows].double() @ k[0, 0].double().T  # (8, n): explicit rows of the similarity
    ref = (sim @ v[0, 0].double()) / (sim.sum(-1, keepdim=True) + 1e-6)
    assert rel_err(out[0, 0, rows], ref) < FP32_TOL


MM_SHAPES = [  # B, H, prompt tokens, image tokens, compressed tokens, D
    (1, 1, 1, 1, 1, 4),
    (2, 3, 7, 15, 4, 8),
    (2, 2, 77, 64, 16, 64),
]


@pytest.mark.parametrize("eta_kind", ["ratio", "float", "tensor"])
@pytest.mark.parametrize("shape", MM_SHAPES)
def test_mm_edit_attention_matches_reference_fp32(shape, eta_kind):
    inputs = mm_inputs(*shape)
    b, h = shape[:2]
    eta = {"ratio": None, "float": 0.3, "tensor": torch.rand(b, h, 1, 1)}[eta_kind]
    o_txt, o_img = mm_edit_attention(*inputs, eta=eta)
    r_txt, r_img = mm_edit_attention_ref(*inputs, eta=eta)
    assert o_txt.shape == inputs[0].shape and o_img.shape == inputs[3].shape
    assert rel_err(o_txt, r_txt) < FP32_TOL
    assert rel_err(o_img, r_img) < FP32_TOL


def test_mm_edit_attention_default_eta_is_token_ratio():
    inputs = mm_inputs(1, 2, 10, 30, 8, 16)
    default = mm_edit_attention(*inputs)[1]
    explicit = mm_edit_attention(*inputs, eta=30 / 40)[1]
    assert torch.allclose(default, explicit, rtol=0, atol=1e-6)


def test_mm_edit_attention_prompt_rows_are_the_original_joint_attention_rows():
    inputs = mm_inputs(2, 2, 9, 20, 5, 16)
    q_txt, k_txt, v_txt, q_img, k_img, v_img = inputs[:6]
    o_txt, _ = mm_edit_attention(*inputs)
    joint = softmax_attention_ref(torch.cat((q_txt, q_img), -2), torch.cat((k_txt, k_img), -2), torch.cat((v_txt, v_img), -2))
    assert rel_err(o_txt, joint[:, :, :9]) < FP32_TOL


def test_mm_edit_attention_routes_softmax_parts_through_the_given_function():
    calls = []

    def counting_softmax(q, k, v):
        calls.append((q.shape[-2], k.shape[-2]))
        return softmax_attention_ref(q, k, v).to(q.dtype)

    inputs = mm_inputs(1, 2, 6, 12, 3, 8)
    o_txt, o_img = mm_edit_attention(*inputs, softmax_attention=counting_softmax)
    assert sorted(calls) == [(6, 18), (12, 6)]
    r_txt, r_img = mm_edit_attention_ref(*inputs)
    assert rel_err(o_txt, r_txt) < FP32_TOL and rel_err(o_img, r_img) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mm_edit_attention_low_precision(dtype):
    inputs = mm_inputs(2, 2, 33, 48, 12, 64, dtype=dtype)
    o_txt, o_img = mm_edit_attention(*inputs)
    r_txt, r_img = mm_edit_attention_ref(*inputs)
    for o, r in ((o_txt, r_txt), (o_img, r_img)):
        assert o.dtype == dtype and torch.isfinite(o).all()
        assert rel_err(o, r) < LOW_PRECISION_TOL[dtype]


def test_gradcheck_linear_attention():
    q = features(1, 2, 5, 3, dtype=torch.float64).add_(0.1).requires_grad_()
    k = features(1, 2, 4, 3, dtype=torch.float64).add_(0.1).requires_grad_()
    v = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_attention, (q, k, v))


def test_gradcheck_mm_edit_attention():
    inputs = [t.double().requires_grad_() for t in mm_inputs(1, 2, 3, 4, 2, 3)]
    for t in (inputs[6], inputs[7]):  # keep the features strictly positive under perturbation
        t.data.add_(0.1)
    eta = torch.rand(1, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: mm_edit_attention(*a[:-1], eta=a[-1]), (*inputs, eta))


@pytest.mark.parametrize("b", [1, 3])
def test_add_linear_attention_adds_into_the_accumulator(b):
    q, k, v = features(b, 2, 21, 8), features(b, 2, 6, 8), torch.randn(b, 2, 6, 8)
    acc = torch.randn(b, 21, 2, 8).transpose(1, 2)  # a head view of (B, N, C) tokens, as the layer's
    start = acc.double().clone()
    add_linear_attention(acc, q, linear_attention_state(k, v))
    assert rel_err(acc, start + linear_attention_ref(q, k, v)) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_img", [4096, 16384, 65536])
def test_mix_image_rows_prompt_weight_at_real_token_ratios(n_img, dtype):
    # A learned eta near 1 as a float32 tensor; with the image-image part zero (a zero state)
    # the image rows are (1 - eta) * softmax, held against float64 on sampled rows.
    b, h, d, n_txt = 1, 2, 8, 333
    q_img, k_txt, v_txt = (torch.randn(b, h, n, d).to(dtype) for n in (n_img, n_txt, n_txt))
    logit = math.log(n_img / n_txt) + torch.tensor([0.3, -0.2])
    eta, rest = torch.sigmoid(logit).view(1, h, 1, 1), torch.sigmoid(-logit).view(1, h, 1, 1)
    soft = torch.nn.functional.scaled_dot_product_attention(q_img, k_txt, v_txt)
    out = mix_image_rows(torch.empty_like(q_img), q_img.relu(), torch.zeros(b, h, d, d + 1), soft, eta, rest)
    rows = torch.randperm(n_img)[:256]
    ref = (1 - eta.double()) * softmax_attention_ref(q_img[:, :, rows], k_txt, v_txt)
    tol = {torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and rel_err(out[:, :, rows], ref) < tol
    # A lerp with eta rounded to the activations' dtype gets the prompt weight wrong.
    old = torch.lerp(softmax_attention_ref(q_img[:, :, rows], k_txt, v_txt).to(dtype),
                     torch.zeros(b, h, 256, d, dtype=dtype), eta.to(dtype))
    old_weight_error = ((1 - eta.to(dtype).double()) / (1 - eta.double()) - 1).abs().max().item()
    if old_weight_error > 2 * tol:
        assert rel_err(old, ref) > tol
