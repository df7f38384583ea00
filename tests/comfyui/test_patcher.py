"""The ComfyUI patchers on ComfyUI's own SD3/SD3.5 and PixArt classes, built small."""
import copy
import logging

import pytest
import torch

import comfy.model_management
import comfy.sample
import comfy.sd

from edit_core.fixtures import tiny_models
from edit_core.bank import EDiTError, init_bank
from edit_core.comfyui.model import model_spec
from edit_core.attention.layers import merge_heads, split_heads
from edit_core.distill.losses import StudentLoss
from edit_core.comfyui.patcher import (STUDENT, TEACHER, EditOptions, EditState, apply_edit, call_model, edit_bank_of,
                                       layer_inputs)
from edit_core.comfyui.pixart import PixArtAttentionPatch
from edit_core.comfyui.sd3 import SD3BlockPatch, sd3_modulated_input, sd3_pre_attention
from edit_core.attention.reference import edit_attention_ref, hybrid_attention_ref, softmax_attention_ref
from helpers import (FP32_TOL, LAYER_LOW_PRECISION_TOL, ORIGINAL_DESIGN, pixart_inputs, randomized_bank, rel_err, run,
                     sd15_patcher, sd3_inputs)

DESIGNS = {"default": {}, "original": ORIGINAL_DESIGN}  # init_bank keywords: the shipped default, the design before it

SD3_VARIANTS = {
    "sd3": dict(depth=2, mmditx_layers=(), qk_norm=False),
    "sd35": dict(depth=2, mmditx_layers=(0,), qk_norm=True),
}


@pytest.fixture(scope="module", params=list(SD3_VARIANTS))
def sd3(request):
    return tiny_models.sd3_patcher(**SD3_VARIANTS[request.param], seed=3, attention_gain=4.0)


@pytest.fixture(scope="module")
def sd35():
    return tiny_models.sd3_patcher(**SD3_VARIANTS["sd35"], seed=4, attention_gain=4.0)


@pytest.fixture(scope="module")
def pixart():
    return tiny_models.pixart_patcher(hidden=96, heads=4, depth=2, seed=5, attention_gain=4.0)


def family_inputs(patcher, **kw):
    return sd3_inputs(**kw) if model_spec(patcher).family == "sd3" else pixart_inputs(**kw)


@pytest.fixture(autouse=True)
def unload_models():
    yield
    comfy.model_management.unload_all_models()


def applied_patches(model):
    """Modules whose forward is not their class's own (an object patch in place). ComfyUI
    restores a patched forward by setting the original bound method back on the instance."""
    def own(m):
        f = m.__dict__.get("forward")
        return f is None or (getattr(f, "__self__", None) is m and f.__func__ is type(m).forward)
    return [n for n, m in model.named_modules() if not own(m)]


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_disabled_patch_and_teacher_calls_are_bit_identical(family, sd3, pixart):
    base = sd3 if family == "sd3" else pixart
    bank = randomized_bank(init_bank(model_spec(base)))
    inputs = family_inputs(base)
    original = run(base, inputs)
    disabled = run(apply_edit(base, bank, EditOptions(enabled=False)), inputs)
    patched = apply_edit(base, bank)
    teacher = run(patched, inputs, edit_mode=TEACHER)
    student = run(patched, inputs)
    assert torch.equal(disabled, original)
    assert torch.equal(teacher, original)
    assert not torch.allclose(student, original, atol=1e-3)
    assert torch.equal(run(apply_edit(base, bank, EditOptions(enabled=False)), inputs, edit_mode=STUDENT), student)


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_patching_a_clone_leaves_the_base_model_untouched(family, sd3, pixart):
    base = sd3 if family == "sd3" else pixart
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    modules = [n for n, _ in base.model.named_modules()]
    inputs = family_inputs(base)
    before = run(base, inputs)

    patched = apply_edit(base, randomized_bank(init_bank(model_spec(base))))
    assert base.object_patches == {} and edit_bank_of(base) is None
    run(patched, inputs)
    assert applied_patches(base.model), "the patched clone's object patches were applied while loaded"
    # The original ModelPatcher, used after the clone, computes what it computed before.
    assert torch.equal(run(base, inputs), before)
    comfy.model_management.unload_all_models()
    assert applied_patches(base.model) == []
    assert [n for n, _ in base.model.named_modules()] == modules
    after = base.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def modulated_input_ref(xb, x, c, second):
    """norm1(x) * (1 + scale) + shift with the x block's (attn2: second) adaLN shift and scale."""
    chunks = xb.adaLN_modulation(c).chunk(9 if xb.x_block_self_attn else 6, dim=1)
    shift, scale = chunks[6:8] if second else chunks[:2]
    return xb.norm1(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sd3_block_reference(block, layer, layer2, context, x, c, grid, cf_input="residual"):
    """The whole SD3 joint block in float64: core pre/post attention, reference EDiT formulas;
    ConvFusion reads the residual stream x or the modulated attention input (``cf_input``), the
    low-rank q/k/v update (if any) the modulated input."""
    block = copy.deepcopy(block).double()
    cb, xb = block.context_block, block.x_block
    context, x, c = context.double(), x.double(), c.double()
    flat = lambda qkv: [t.reshape(t.shape[0], t.shape[1], -1) for t in qkv]  # noqa: E731
    ctx_qkv, ctx_inter = cb.pre_attention(context, c)
    if xb.x_block_self_attn:
        x_qkv, x_qkv2, x_inter = xb.pre_attention_x(x, c)
    else:
        (x_qkv, x_inter), x_qkv2 = xb.pre_attention(x, c), None
    h = modulated_input_ref(xb, x, c, False)
    o_txt, o_img = hybrid_attention_ref(layer, h if cf_input == "modulated" else x, *flat(ctx_qkv), *flat(x_qkv),
                                        grid, h=h)
    context = None if cb.pre_only else cb.post_attention(o_txt, *ctx_inter)
    if x_qkv2 is None:
        return context, xb.post_attention(o_img, *x_inter)
    h2 = modulated_input_ref(xb, x, c, True)
    attn2 = edit_attention_ref(layer2, h2 if cf_input == "modulated" else x, *flat(x_qkv2), grid, h=h2)
    return context, xb.post_attention_x(o_img, attn2, *x_inter)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("grid,n_txt,batch", [((5, 7), 9, 2), ((1, 13), 4, 1), ((8, 8), 154, 2)])
def test_sd3_patched_blocks_match_float64_reference(sd3, grid, n_txt, batch, design):
    dm = sd3.model.diffusion_model
    bank = randomized_bank(init_bank(model_spec(sd3), **DESIGNS[design]), scale=0.3)
    c = dm.hidden_size
    for i, block in enumerate(dm.joint_blocks):  # includes the pre_only last block
        layer = bank.layer(f"joint_blocks.{i}.attn")
        layer2 = bank.layer(f"joint_blocks.{i}.attn2") if block.x_block.x_block_self_attn else None
        state = EditState()
        patch = SD3BlockPatch(block.forward, block, i, layer, layer2, state, qkv_update=bank.config.qkv_rank > 0)
        context, x, vec = torch.randn(batch, n_txt, c), torch.randn(batch, grid[0] * grid[1], c), torch.randn(batch, c)
        with torch.no_grad(), state.running(True, grid) as to:
            out_ctx, out_x = patch(context, x, c=vec, use_checkpoint=False, transformer_options=to)
            ref_ctx, ref_x = sd3_block_reference(block, layer, layer2, context, x, vec, grid)
        assert rel_err(out_x, ref_x) < FP32_TOL
        if block.context_block.pre_only:
            assert out_ctx is None and ref_ctx is None
        else:
            assert rel_err(out_ctx, ref_ctx) < FP32_TOL


def pixart_block_reference(block, layer, x, y, t, grid):
    block = copy.deepcopy(block).double()
    attn = block.attn

    def reference_attention(x, mask=None, HW=None, **kwargs):
        b, n, c = x.shape
        q, k, v = attn.qkv(x).reshape(b, n, 3, c).unbind(2)
        return attn.proj(edit_attention_ref(layer, x, q, k, v, grid))

    attn.forward = reference_attention
    return block(x.double(), y.double(), t.double(), HW=(2 * grid[0], 2 * grid[1]))


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("grid,batch", [((5, 7), 2), ((1, 16), 1), ((16, 17), 2)])
def test_pixart_patched_blocks_match_float64_reference(pixart, grid, batch, design):
    dm = pixart.model.diffusion_model
    bank = randomized_bank(init_bank(model_spec(pixart), **DESIGNS[design]), scale=0.3)
    c = dm.hidden_size
    for i, block in enumerate(dm.blocks):
        layer = bank.layer(f"blocks.{i}.attn")
        x, y, t = torch.randn(batch, grid[0] * grid[1], c), torch.randn(1, batch * 12, c), torch.randn(batch, 6 * c)
        state = EditState()
        block.attn.forward = PixArtAttentionPatch(type(block.attn).forward.__get__(block.attn), block.attn, i, layer,
                                                  state)
        try:
            with torch.no_grad(), state.running(True, grid):
                out = block(x, y, t, HW=(2 * grid[0], 2 * grid[1]))
        finally:
            del block.attn.forward
        with torch.no_grad():
            ref = pixart_block_reference(block, layer, x, y, t, grid)
        assert rel_err(out, ref) < FP32_TOL


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd3_block_in_low_precision_matches_float64_reference(sd35, dtype, design):
    block = sd35.model.diffusion_model.joint_blocks[0]
    bank = randomized_bank(init_bank(model_spec(sd35), **DESIGNS[design]), scale=0.3)
    layer, layer2 = bank.layer("joint_blocks.0.attn"), bank.layer("joint_blocks.0.attn2")
    low = copy.deepcopy(block).to(dtype)
    grid, c = (9, 14), sd35.model.diffusion_model.hidden_size
    context, x, vec = (torch.randn(2, 20, c).to(dtype), torch.randn(2, 126, c).to(dtype), torch.randn(2, c).to(dtype))
    state = EditState()
    with torch.no_grad(), state.running(True, grid) as to:
        _, out_x = SD3BlockPatch(low.forward, low, 0, layer, layer2, state, qkv_update=bank.config.qkv_rank > 0)(
            context, x, c=vec, transformer_options=to)
        _, ref_x = sd3_block_reference(low, layer, layer2, context, x, vec, grid)
    assert out_x.dtype == dtype and torch.isfinite(out_x).all()
    # The block's own projections and MLP also run in low precision here.
    assert rel_err(out_x, ref_x) < 2 * LAYER_LOW_PRECISION_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights(dtype):
    fp32 = tiny_models.sd3_patcher(**SD3_VARIANTS["sd35"], seed=6)
    low = tiny_models.sd3_patcher(**SD3_VARIANTS["sd35"], seed=6, dtype=dtype)
    assert low.model.diffusion_model.joint_blocks[0].x_block.attn.qkv.weight.dtype == dtype
    bank = randomized_bank(init_bank(model_spec(fp32)))
    inputs = sd3_inputs()
    assert torch.equal(run(apply_edit(low, bank, EditOptions(enabled=False)), inputs), run(low, inputs))
    out_low, out_fp32 = run(apply_edit(low, bank), inputs), run(apply_edit(fp32, bank), inputs)
    assert torch.isfinite(out_low).all()
    assert rel_err(out_low, out_fp32.double()) < 0.05  # weights rounded to 8-11 bits


def sample(patcher, latent_hw, pos_tokens=154, neg_tokens=77, batch=1, steps=3, seed=11):
    g = torch.Generator().manual_seed(seed)
    pos = [[torch.randn(1, pos_tokens, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]
    neg = [[torch.randn(1, neg_tokens, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]
    latent = torch.zeros(batch, 16, *latent_hw)
    noise = torch.randn(latent.shape, generator=g)
    return comfy.sample.sample(patcher, noise, steps, 4.0, "euler", "simple", pos, neg, latent, seed=seed)


@pytest.mark.parametrize("latent_hw,batch", [((25, 39), 2), ((2, 40), 1), ((1, 1), 1)])
def test_sd3_sampling_with_cfg_prompts_of_different_lengths(sd35, latent_hw, batch):
    # 200x312 px (odd, non-square token grid 13x20), a 1 x 20 grid, and a single token.
    bank = randomized_bank(init_bank(model_spec(sd35)))
    original = sample(sd35, latent_hw, batch=batch)
    edited = sample(apply_edit(sd35, bank), latent_hw, batch=batch)
    assert edited.shape == original.shape and torch.isfinite(edited).all()
    assert not torch.allclose(edited, original, atol=1e-4)
    assert torch.equal(sample(apply_edit(sd35, bank, EditOptions(enabled=False)), latent_hw, batch=batch), original)


def test_min_tokens_keeps_small_images_on_original_attention(sd35):
    bank = randomized_bank(init_bank(model_spec(sd35)))
    patched = apply_edit(sd35, bank, EditOptions(min_tokens=100))
    small, large = sd3_inputs(latent_hw=(16, 16)), sd3_inputs(latent_hw=(20, 22))  # 64 and 110 tokens
    assert torch.equal(run(patched, small), run(sd35, small))
    assert not torch.allclose(run(patched, large), run(sd35, large), atol=1e-3)


def test_sampling_range_selects_steps_by_sigma(sd35):
    bank = randomized_bank(init_bank(model_spec(sd35)))
    patched = apply_edit(sd35, bank, EditOptions(start_percent=0.5, end_percent=1.0))
    ms = sd35.get_model_object("model_sampling")
    boundary = ms.percent_to_sigma(0.5)
    early, late = sd3_inputs(sigma=min(1.0, boundary + 0.2)), sd3_inputs(sigma=boundary - 0.2)
    early_sigmas = {"sigmas": early["t"]}
    late_sigmas = {"sigmas": late["t"]}
    assert torch.equal(run(patched, early, **early_sigmas), run(sd35, early))
    assert not torch.allclose(run(patched, late, **late_sigmas), run(sd35, late), atol=1e-3)


def test_layer_selection_patches_only_the_chosen_layers(sd35):
    bank = randomized_bank(init_bank(model_spec(sd35)))
    only_attn2 = apply_edit(sd35, bank, EditOptions(layers="0:attn2"))
    assert [k for k in only_attn2.object_patches if "joint_blocks" in k] == ["diffusion_model.joint_blocks.0.forward"]
    patch = only_attn2.object_patches["diffusion_model.joint_blocks.0.forward"]
    assert patch.attn is None and patch.attn2 is bank.layer("joint_blocks.0.attn2")
    block1 = apply_edit(sd35, bank, EditOptions(layers="1"))
    assert [k for k in block1.object_patches if "joint_blocks" in k] == ["diffusion_model.joint_blocks.1.forward"]
    with pytest.raises(EDiTError, match="selects none"):
        apply_edit(sd35, bank, EditOptions(layers="7"))


def test_reapplying_edit_replaces_the_earlier_patch(sd35):
    bank_a = randomized_bank(init_bank(model_spec(sd35)), seed=1)
    bank_b = randomized_bank(init_bank(model_spec(sd35)), seed=2)
    inputs = sd3_inputs()
    twice = apply_edit(apply_edit(sd35, bank_a), bank_b)
    assert edit_bank_of(twice) is bank_b
    assert torch.equal(run(twice, inputs), run(apply_edit(sd35, bank_b), inputs))


def lora_for(patcher, names, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = patcher.model.state_dict()
    lora = {}
    for name in names:
        out_f, in_f = sd[name + ".weight"].shape
        lora[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.2
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.2
    return lora


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_lora_on_attention_projections_composes_with_edit_in_either_order(family, sd35, pixart, caplog):
    base = sd35 if family == "sd3" else pixart
    names = (["diffusion_model.joint_blocks.0.x_block.attn.qkv", "diffusion_model.joint_blocks.0.x_block.attn2.qkv",
              "diffusion_model.joint_blocks.1.context_block.attn.qkv", "diffusion_model.joint_blocks.0.x_block.attn.proj"]
             if family == "sd3" else
             ["diffusion_model.blocks.0.attn.qkv", "diffusion_model.blocks.1.attn.proj"])
    lora = lora_for(base, names)
    bank = randomized_bank(init_bank(model_spec(base)))
    inputs = family_inputs(base)
    with caplog.at_level(logging.WARNING):
        lora_then_edit = apply_edit(comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)[0], bank)
        edit_then_lora = comfy.sd.load_lora_for_models(apply_edit(base, bank), None, lora, 1.0, 0)[0]
    assert "lora key not loaded" not in caplog.text
    assert sorted(k[:-len(".weight")] for k in lora_then_edit.patches) == sorted(names)
    a, b = run(lora_then_edit, inputs), run(edit_then_lora, inputs)
    edit_only = run(apply_edit(base, bank), inputs)
    assert torch.equal(a, b)
    assert not torch.allclose(a, edit_only, atol=1e-3)


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_a_call_edits_wrapper_did_not_see_runs_the_original_and_warns_once(family, sd35, pixart, caplog):
    base = sd35 if family == "sd3" else pixart
    patched = apply_edit(base, randomized_bank(init_bank(model_spec(base))))
    inputs = family_inputs(base)
    original = run(base, inputs)
    assert not torch.equal(run(patched, inputs), original)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        for _ in range(2):  # apply_model without the patcher's wrappers: EDiT's wrapper never runs
            out = patched.model.apply_model(inputs["x"], inputs["t"], c_crossattn=inputs["c_crossattn"],
                                            y=inputs.get("y"), transformer_options={})
            assert torch.equal(out, original)
    assert len([r for r in caplog.records if "EDiT's wrapper did not see" in r.getMessage()]) == 1


def query_scaling_override(calls):
    """An attention override (ComfyUI 0.3.75's ``optimized_attention_override``) that changes
    the result: the way to see who honours it."""
    def override(func, *args, **kwargs):
        calls.append(args[0].shape)
        return func(args[0] * 0.5, *args[1:], **kwargs)
    return override


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_edit_off_and_teacher_calls_match_core_under_an_attention_override(family, sd35, pixart):
    base = sd35 if family == "sd3" else pixart
    calls = []
    overridden = base.clone()
    overridden.model_options["transformer_options"]["optimized_attention_override"] = query_scaling_override(calls)
    bank = randomized_bank(init_bank(model_spec(base)))
    inputs = family_inputs(base)
    original = run(overridden, inputs)
    patched = apply_edit(overridden, bank)
    assert torch.equal(run(apply_edit(overridden, bank, EditOptions(enabled=False)), inputs), original)
    assert torch.equal(run(patched, inputs, edit_mode=TEACHER), original)
    calls.clear()
    student = run(patched, inputs)
    assert not torch.allclose(student, original, atol=1e-3)
    if family == "sd3":  # core SD3 passes transformer_options to its attention; core PixArt (0.3.75) does not
        assert not torch.equal(original, run(base, inputs)), "the override changed nothing: the test tests nothing"
        assert calls, "EDiT's softmax parts did not go through the attention override"
        assert not torch.equal(student, run(apply_edit(base, bank), inputs))


def test_pixart_teacher_capture_runs_core_and_records_its_attention_output(pixart):
    patched = apply_edit(pixart, randomized_bank(init_bank(model_spec(pixart))))
    inputs = pixart_inputs()
    original = run(pixart, inputs)
    captured = {}
    comfy.model_management.load_models_gpu([patched])  # call_model calls a loaded model
    with torch.no_grad():
        out = call_model(patched, inputs["x"], inputs["t"], {"c_crossattn": inputs["c_crossattn"]}, TEACHER,
                         lambda name, grid, tensors: captured.__setitem__(name, (grid, tensors)))
    assert torch.equal(out, original)
    assert sorted(captured) == ["blocks.0.attn", "blocks.1.attn"]
    heads = model_spec(pixart).heads
    for name, (grid, tensors) in captured.items():
        assert grid == (17, 25)
        x = layer_inputs(pixart.model.diffusion_model, name, tensors)
        reference = merge_heads(softmax_attention_ref(*(split_heads(x[n], heads) for n in ("q", "k", "v"))))
        assert rel_err(tensors["out"], reference) < FP32_TOL, name


def test_unsupported_model_gets_a_clear_error():
    model = sd15_patcher()
    with pytest.raises(EDiTError, match="SD3/SD3.5 .*PixArt.*UNetModel"):
        apply_edit(model, init_bank(model_spec(tiny_models.sd3_patcher())))
    assert model.object_patches == {}


# Issue 11: ConvFusion reading the modulated attention input, and the low-rank q/k/v update.
SD3_OPTIONS = [dict(cf_input="modulated"), dict(qkv_rank=4),
               dict(cf_input="modulated", qkv_rank=3, local_placement="outside", cf_kernel=0, sc_kernel=1, sc_stride=1)]


def test_modulated_input_is_what_core_projects(sd3):
    dm = sd3.model.diffusion_model
    c = dm.hidden_size
    context, x, vec = torch.randn(2, 7, c), torch.randn(2, 35, c), torch.randn(2, c)
    for block in dm.joint_blocks:
        xb = block.x_block
        _, _, x_qkv, x_qkv2, _ = sd3_pre_attention(block, context, x, vec)
        with torch.no_grad():
            assert all(torch.equal(a.reshape(b.shape), b) for a, b in
                       zip(xb.attn.pre_attention(sd3_modulated_input(xb, x, vec)), x_qkv))
            if x_qkv2 is not None:
                assert all(torch.equal(a.reshape(b.shape), b) for a, b in
                           zip(xb.attn2.pre_attention(sd3_modulated_input(xb, x, vec, second=True)), x_qkv2))


@pytest.mark.parametrize("options", SD3_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_sd3_patched_blocks_with_student_options_match_float64_reference(sd3, options):
    dm = sd3.model.diffusion_model
    bank = randomized_bank(init_bank(model_spec(sd3), **options), scale=0.3)
    c, grid, n_txt = dm.hidden_size, (5, 7), 9
    for i, block in enumerate(dm.joint_blocks):
        layer = bank.layer(f"joint_blocks.{i}.attn")
        layer2 = bank.layer(f"joint_blocks.{i}.attn2") if block.x_block.x_block_self_attn else None
        state = EditState()
        patch = SD3BlockPatch(block.forward, block, i, layer, layer2, state, cf_input=bank.config.cf_input,
                              qkv_update=bank.config.qkv_rank > 0)
        context, x, vec = torch.randn(2, n_txt, c), torch.randn(2, 35, c), torch.randn(2, c)
        with torch.no_grad(), state.running(True, grid) as to:
            out_ctx, out_x = patch(context, x, c=vec, use_checkpoint=False, transformer_options=to)
            ref_ctx, ref_x = sd3_block_reference(block, layer, layer2, context, x, vec, grid, bank.config.cf_input)
        assert rel_err(out_x, ref_x) < FP32_TOL
        if not block.context_block.pre_only:
            assert rel_err(out_ctx, ref_ctx) < FP32_TOL


PIXART_OPTIONS = dict(qkv_rank=3, local_placement="outside", cf_kernel=0, sc_kernel=1, sc_stride=1)


@pytest.mark.parametrize("family,options", [("sd3", o) for o in SD3_OPTIONS] + [("pixart", PIXART_OPTIONS)],
                         ids=lambda o: o if isinstance(o, str) else ",".join(f"{k}={v}" for k, v in o.items()))
def test_student_options_keep_teacher_and_disabled_bit_identical_and_replay_for_distillation(sd35, pixart, family,
                                                                                            options):
    base = sd35 if family == "sd3" else pixart
    bank = randomized_bank(init_bank(model_spec(base), **options))
    inputs = family_inputs(base)
    original = run(base, inputs)
    patched = apply_edit(base, bank)
    assert torch.equal(run(apply_edit(base, bank, EditOptions(enabled=False)), inputs), original)
    assert torch.equal(run(patched, inputs, edit_mode=TEACHER), original)
    captured = {}
    student = run(patched, inputs, edit_capture=lambda name, grid, tensors: captured.setdefault(name, (grid, tensors)))
    assert not torch.allclose(student, original, atol=1e-3)
    assert set(captured) == set(bank.config.layers)
    # Layer-wise distillation replays each layer from the captured block inputs: it must feed
    # the layer what the patched model fed it.
    loss = StudentLoss(bank, patched)
    with torch.no_grad():
        for name, (grid, tensors) in captured.items():
            assert loss.layer_loss(name, tensors, grid) < 1e-10, name
