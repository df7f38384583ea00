"""ConvFusion, SpatialCompressor and the EDiT layers against float64 references."""
import math

import pytest
import torch
import torch.nn.functional as F

from torch.func import functional_call

from edit_core.attention.layers import (ConvFusion, EDiTAttention, HybridEDiTAttention, LocalValueConv,
                                        SpatialCompressor, merge_heads, split_heads)
from edit_core.attention.reference import (conv_fusion_ref, edit_attention_ref, hybrid_attention_ref,
                                           linear_attention_ref, local_value_ref, softmax_attention_ref,
                                           spatial_compressor_ref)
from helpers import FP32_TOL, LAYER_LOW_PRECISION_TOL, randomize, rel_err



GRIDS = [(1, 1), (1, 7), (7, 1), (5, 5), (7, 4), (11, 13), (16, 16)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("b,c,c_out,r", [(1, 64, 64, 32), (2, 48, 96, 8), (3, 32, 16, 4)])
def test_conv_fusion_matches_reference(grid, b, c, c_out, r):
    cf = randomize(ConvFusion(c, c_out, reduction=r))
    x = torch.randn(b, grid[0] * grid[1], c)
    out = cf(x, grid)
    assert out.shape == (b, x.shape[1], c_out)
    assert rel_err(out, conv_fusion_ref(cf, x, grid)) < FP32_TOL


def test_conv_fusion_starts_at_zero():
    cf = ConvFusion(64, 64)
    x = torch.randn(2, 35, 64)
    assert torch.equal(cf(x, (5, 7)), torch.zeros(2, 35, 64))


@pytest.mark.parametrize("grid", GRIDS + [(2, 3), (13, 2)])
@pytest.mark.parametrize("b,c", [(1, 8), (2, 40)])
def test_spatial_compressor_matches_reference(grid, b, c):
    sc = randomize(SpatialCompressor(c))
    x = torch.randn(b, grid[0] * grid[1], c)
    out = sc(x, grid)
    h, w = -(-grid[0] // 2), -(-grid[1] // 2)
    assert out.shape == (b, h * w, c)
    assert rel_err(out, spatial_compressor_ref(sc, x, grid)) < FP32_TOL


@pytest.mark.parametrize("grid", [(1, 1), (1, 5), (6, 9), (13, 7)])
def test_spatial_compressor_init_is_a_normalised_low_pass(grid):
    sc = SpatialCompressor(4)
    const = torch.full((1, grid[0] * grid[1], 4), 3.0)
    assert torch.allclose(sc(const, grid), torch.full_like(sc(const, grid), 3.0), atol=1e-6)
    # A checkerboard (highest frequency) is strongly attenuated in the interior.
    hh, ww = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = ((hh + ww) % 2).float().mul(2).sub(1).reshape(1, 256, 1).expand(1, 256, 4)
    out = sc(checker.contiguous(), (16, 16)).reshape(1, 8, 8, 4)
    assert out[:, 1:-1, 1:-1].abs().max() < 1e-6


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("k", [3, 5])
def test_local_value_conv_matches_reference_and_starts_at_zero(grid, k):
    local = LocalValueConv(12, k)
    v = torch.randn(2, grid[0] * grid[1], 12)
    assert torch.equal(local(v, grid), torch.zeros_like(v))
    randomize(local)
    assert rel_err(local(v, grid), local_value_ref(local, v, grid)) < FP32_TOL


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("b,heads,d", [(1, 1, 8), (2, 3, 16)])
def test_edit_attention_matches_reference(grid, b, heads, d):
    c = heads * d
    layer = randomize(EDiTAttention(c, heads, reduction=4), scale=0.3)
    n = grid[0] * grid[1]
    x, q, k, v = (torch.randn(b, n, c) for _ in range(4))
    out = layer(x, q, k, v, grid)
    assert out.shape == (b, n, c)
    assert rel_err(out, edit_attention_ref(layer, x, q, k, v, grid)) < FP32_TOL


def test_untrained_edit_layer_is_plain_relu_linear_attention_over_compressed_kv():
    heads, d, grid = 4, 16, (9, 6)
    c, n = heads * d, 54
    layer = EDiTAttention(c, heads)
    x, q, k, v = (torch.randn(2, n, c) for _ in range(4))
    sc = SpatialCompressor(c)  # a fresh compressor: the same low-pass the layer starts with
    k_c, v_c = spatial_compressor_ref(sc, k, grid), spatial_compressor_ref(sc, v, grid)
    expected = linear_attention_ref(torch.relu(split_heads(q.double(), heads)),
                                    torch.relu(split_heads(k_c, heads)), split_heads(v_c, heads))
    assert rel_err(layer(x, q, k, v, grid), merge_heads(expected)) < FP32_TOL


@pytest.mark.parametrize("prompt_rows", [True, False])
@pytest.mark.parametrize("eta_mode", ["ratio", "learned"])
@pytest.mark.parametrize("grid,n_txt", [((1, 1), 1), ((1, 9), 4), ((7, 5), 11), ((12, 12), 77)])
def test_hybrid_attention_matches_reference(grid, n_txt, eta_mode, prompt_rows):
    heads, d, b = 2, 16, 2
    c, n = heads * d, grid[0] * grid[1]
    layer = randomize(HybridEDiTAttention(c, heads, reduction=4, eta_mode=eta_mode), scale=0.3)
    x, q, k, v = (torch.randn(b, n, c) for _ in range(4))
    txt = [torch.randn(b, n_txt, c) for _ in range(3)]
    o_txt, o_img = layer(x, *txt, q, k, v, grid, prompt_rows=prompt_rows)
    r_txt, r_img = hybrid_attention_ref(layer, x, *txt, q, k, v, grid)
    assert rel_err(o_img, r_img) < FP32_TOL
    if prompt_rows:
        assert rel_err(o_txt, r_txt) < FP32_TOL
    else:
        assert o_txt is None


def test_local_branch_can_be_left_out():
    layer = randomize(EDiTAttention(32, 2, reduction=4, local_kernel=0), scale=0.3)
    x, q, k, v = (torch.randn(1, 35, 32) for _ in range(4))
    assert layer.local is None
    assert rel_err(layer(x, q, k, v, (5, 7)), edit_attention_ref(layer, x, q, k, v, (5, 7))) < FP32_TOL


def test_learned_eta_starts_at_the_token_ratio():
    layer = HybridEDiTAttention(32, 2)
    assert torch.allclose(layer.mix_weights(300, 100)[0], torch.full((1, 2, 1, 1), 0.75))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_edit_layers_low_precision(dtype):
    heads, d, grid, b = 4, 32, (9, 14), 2
    c, n = heads * d, grid[0] * grid[1]
    layer = randomize(HybridEDiTAttention(c, heads, reduction=8), scale=0.2)
    x, q, k, v = (torch.randn(b, n, c) for _ in range(4))
    txt = [torch.randn(b, 20, c) for _ in range(3)]
    low = [t.to(dtype) for t in (x, *txt, q, k, v)]
    o_txt, o_img = layer(*low, grid)
    r_txt, r_img = hybrid_attention_ref(layer, *low, grid)
    for o, r in ((o_txt, r_txt), (o_img, r_img)):
        assert o.dtype == dtype and torch.isfinite(o).all()
        assert rel_err(o, r) < LAYER_LOW_PRECISION_TOL[dtype]


def gradcheck_module(module, x, grid):
    """gradcheck in float64 with respect to the input and every parameter."""
    module = randomize(module).double()
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]

    def run(x, *p):
        return functional_call(module, dict(zip(names, p)), (x, grid))

    return torch.autograd.gradcheck(run, (x.double().requires_grad_(), *params))


def test_gradcheck_conv_fusion():
    assert gradcheck_module(ConvFusion(8, 6, reduction=2), torch.randn(2, 15, 8), (3, 5))


def test_gradcheck_spatial_compressor():
    assert gradcheck_module(SpatialCompressor(3), torch.randn(2, 35, 3), (5, 7))


def test_gradcheck_local_value_conv():
    assert gradcheck_module(LocalValueConv(3), torch.randn(2, 35, 3), (5, 7))


def test_gradcheck_edit_attention():
    layer = EDiTAttention(4, 2, reduction=2)
    x = torch.randn(1, 6, 4)
    names = [n for n, _ in layer.named_parameters()]
    layer = randomize(layer, scale=0.3).double()
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    q, k, v = (torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def run(x, q, k, v, *p):
        return functional_call(layer, dict(zip(names, p)), (x, q, k, v, (2, 3)))

    assert torch.autograd.gradcheck(run, (x.double().requires_grad_(), q, k, v, *params))


def test_grad_flows_to_every_edit_parameter():
    layer = randomize(HybridEDiTAttention(32, 2, reduction=4), scale=0.3)
    x, q, k, v = (torch.randn(1, 35, 32) for _ in range(4))
    txt = [torch.randn(1, 6, 32) for _ in range(3)]
    o_txt, o_img = layer(x, *txt, q, k, v, (5, 7))
    o_img.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


# The prompt weight 1 - eta at SD3's real token ratios: 1024, 2048 and 4096 px give
# 4096, 16384 and 65536 image tokens, against 333 prompt tokens. With the image-image part
# zeroed (SC(v) = 0, local branch untrained) the image rows are exactly (1 - eta) * softmax(
# q_img, k_txt, v_txt): the prompt-weighted part alone, held against float64 on sampled rows.
PROMPT_WEIGHT_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
N_TXT = 333


@pytest.mark.parametrize("eta_mode", ["learned", "ratio"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("side", [64, 128, 256])
def test_prompt_weight_is_right_at_real_token_ratios_in_low_precision(side, dtype, eta_mode):
    heads, d, grid = 2, 8, (side, side)
    c, n = heads * d, side * side
    layer = HybridEDiTAttention(c, heads, reduction=4, eta_mode=eta_mode)
    with torch.no_grad():
        layer.sc_v.weight.zero_()
        if eta_mode == "learned":
            layer.eta_offset.copy_(torch.tensor([0.3, -0.2]))
    gen = torch.Generator().manual_seed(side)
    x, q, k, v = (torch.randn(1, n, c, generator=gen).to(dtype) for _ in range(4))
    txt = [torch.randn(1, N_TXT, c, generator=gen).to(dtype) for _ in range(3)]
    _, o_img = layer(x, *txt, q, k, v, grid, prompt_rows=False)

    logit = torch.full((heads,), math.log(n / N_TXT), dtype=torch.float64)
    if eta_mode == "learned":
        logit = logit + layer.eta_offset.double()
    rest = torch.sigmoid(-logit).view(1, -1, 1, 1)
    rows = torch.randperm(n, generator=gen)[:256]
    qi, kt, vt = split_heads(q, heads)[:, :, rows], split_heads(txt[1], heads), split_heads(txt[2], heads)
    soft_ref = softmax_attention_ref(qi, kt, vt)
    tol = PROMPT_WEIGHT_TOL[dtype]
    assert rel_err(split_heads(o_img, heads)[:, :, rows], rest * soft_ref) < tol

    # A lerp towards the softmax part with 1 - eta computed after eta was cast to the
    # activations' dtype: where that weight is off by more than twice the tolerance, the same
    # check fails on it, so this test tells the two formulas apart.
    eta = layer.mix_weights(n, N_TXT)[0]
    old_weight = 1 - (eta.to(dtype) if torch.is_tensor(eta) else eta)
    old_rows = torch.zeros_like(qi).lerp_(F.scaled_dot_product_attention(qi, kt, vt), old_weight)
    weight_error = ((torch.as_tensor(old_weight).double() - rest).abs() / rest).max().item()
    if weight_error > 2 * tol:
        assert rel_err(old_rows, rest * soft_ref) > tol


# The student-design variants, each against its float64 reference: odd grids, batch 2.
VARIANTS = {
    "local-outside": dict(local_placement="outside"),
    "no-convfusion": dict(cf_kernel=0),
    "no-compression": dict(sc_kernel=1, sc_stride=1),
    "stride-1": dict(sc_stride=1),
    "qkv-rank-4": dict(qkv_rank=4),
    "all": dict(local_placement="outside", cf_kernel=0, sc_kernel=1, sc_stride=1, qkv_rank=3),
}
VARIANT_GRIDS = [((1, 1), 1), ((7, 5), 11), ((3, 13), 6)]


def variant_layer(kind, options, c, heads):
    if kind == "linear":
        options = {k: v for k, v in options.items() if k != "local_placement"}
        return randomize(EDiTAttention(c, heads, reduction=4, **options), scale=0.3)
    return randomize(HybridEDiTAttention(c, heads, reduction=4, **options), scale=0.3)


def run_variant(layer, x, txt, q, k, v, grid, h):
    if isinstance(layer, HybridEDiTAttention):
        return layer(x, *txt, q, k, v, grid, h=h), hybrid_attention_ref(layer, x, *txt, q, k, v, grid, h=h)
    return (None, layer(x, q, k, v, grid, h=h)), (None, edit_attention_ref(layer, x, q, k, v, grid, h=h))


@pytest.mark.parametrize("kind", ["hybrid", "linear"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("grid,n_txt", VARIANT_GRIDS)
def test_student_variants_match_reference(grid, n_txt, variant, kind):
    heads, d, b = 2, 8, 2
    c, n = heads * d, grid[0] * grid[1]
    layer = variant_layer(kind, VARIANTS[variant], c, heads)
    x, h, q, k, v = (torch.randn(b, n, c) for _ in range(5))  # h: the qkv projection's input, not x
    txt = [torch.randn(b, n_txt, c) for _ in range(3)]
    (o_txt, o_img), (r_txt, r_img) = run_variant(layer, x, txt, q, k, v, grid, h)
    assert o_img.shape == (b, n, c)
    assert rel_err(o_img, r_img) < FP32_TOL
    if o_txt is not None:
        assert rel_err(o_txt, r_txt) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_student_variants_low_precision(variant, dtype):
    heads, d, grid, b = 4, 32, (9, 7), 2
    c, n = heads * d, grid[0] * grid[1]
    layer = variant_layer("hybrid", VARIANTS[variant], c, heads)
    with torch.no_grad():  # a rank-r update of magnitude like q's own, not r times larger
        if layer.qkv_update is not None:
            layer.qkv_update.down.mul_(0.2)
    low = [t.to(dtype) for t in (torch.randn(b, n, c) for _ in range(5))]
    txt = [torch.randn(b, 20, c).to(dtype) for _ in range(3)]
    x, h, q, k, v = low
    (o_txt, o_img), (r_txt, r_img) = run_variant(layer, x, txt, q, k, v, grid, h)
    for o, r in ((o_txt, r_txt), (o_img, r_img)):
        assert o.dtype == dtype and torch.isfinite(o).all()
        assert rel_err(o, r) < LAYER_LOW_PRECISION_TOL[dtype]


def test_local_placement_outside_keeps_the_local_branch_out_of_the_eta_weight():
    heads, c, grid, n_txt = 2, 16, (5, 7), 9
    inside = randomize(HybridEDiTAttention(c, heads, reduction=4), scale=0.3)
    outside = HybridEDiTAttention(c, heads, reduction=4, local_placement="outside")
    outside.load_state_dict(inside.state_dict())
    x, q, k, v = (torch.randn(2, 35, c) for _ in range(4))
    txt = [torch.randn(2, n_txt, c) for _ in range(3)]
    local = split_heads(inside.local(v, grid), heads)
    eta = inside.mix_weights(35, n_txt)[0]
    difference = split_heads(outside(x, *txt, q, k, v, grid)[1] - inside(x, *txt, q, k, v, grid)[1], heads)
    assert rel_err(difference, (1 - eta.double()) * local.double()) < FP32_TOL


def test_untrained_uncompressed_layer_without_convfusion_is_relu_linear_attention_over_q_k_v():
    heads, d, grid = 2, 8, (5, 3)
    c, n = heads * d, 15
    layer = EDiTAttention(c, heads, cf_kernel=0, sc_kernel=1, sc_stride=1)
    assert layer.cf is None and not any(name.startswith("cf.") for name in layer.state_dict())
    x, q, k, v = (torch.randn(2, n, c) for _ in range(4))
    expected = linear_attention_ref(torch.relu(split_heads(q.double(), heads)), torch.relu(split_heads(k.double(), heads)),
                                    split_heads(v.double(), heads))
    assert rel_err(layer(x, q, k, v, grid), merge_heads(expected)) < FP32_TOL


@pytest.mark.parametrize("grid", [(1, 1), (4, 7), (9, 9)])
def test_stride_1_compressor_keeps_the_grid(grid):
    sc = randomize(SpatialCompressor(6, 3, stride=1))
    x = torch.randn(2, grid[0] * grid[1], 6)
    assert sc(x, grid).shape == x.shape
    assert rel_err(sc(x, grid), spatial_compressor_ref(sc, x, grid)) < FP32_TOL
    identity = SpatialCompressor(6, 1, stride=1)
    assert torch.equal(identity(x, grid), x)


def test_untrained_qkv_update_changes_nothing_and_then_learns():
    heads, c, grid = 2, 16, (5, 7)
    plain = randomize(HybridEDiTAttention(c, heads, reduction=4), scale=0.3)
    lora = HybridEDiTAttention(c, heads, reduction=4, qkv_rank=4)
    lora.load_state_dict(plain.state_dict(), strict=False)
    assert torch.equal(lora.qkv_update.up, torch.zeros(3, c, 4)) and lora.qkv_update.down.abs().sum() > 0
    x, h, q, k, v = (torch.randn(2, 35, c) for _ in range(5))
    txt = [torch.randn(2, 6, c) for _ in range(3)]
    for a, b in zip(lora(x, *txt, q, k, v, grid, h=h), plain(x, *txt, q, k, v, grid)):
        assert torch.equal(a, b)
    lora(x, *txt, q, k, v, grid, h=h)[1].square().mean().backward()
    assert lora.qkv_update.up.grad.abs().sum() > 0


def test_gradcheck_hybrid_attention_with_every_option():
    layer = HybridEDiTAttention(4, 2, reduction=2, local_placement="outside", sc_stride=1, qkv_rank=2)
    names = [n for n, _ in layer.named_parameters()]
    layer = randomize(layer, scale=0.3).double()
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x, h, q, k, v = (torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(5))
    txt = [torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def run(x, h, q, k, v, *rest):
        p = rest[3:]
        return functional_call(layer, dict(zip(names, p)), (x, *rest[:3], q, k, v, (2, 3)), {"h": h})

    assert torch.autograd.gradcheck(run, (x, h, q, k, v, *txt, *params))
