"""Apply EDiT stacked with other nodes that patch the same model, in both orders: core
EasyCache and LazyCache (sampling wrappers), a forward patch that replaces
``diffusion_model.forward`` with the class's own forward (as packs that copy core code do)
and an APPLY_MODEL wrapper of our own. EDiT must act where it should and be bit-identical to
the original where it should."""
import pytest
import torch

import comfy.model_management
import comfy.sample
from comfy.patcher_extension import WrappersMP
from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode

from edit_core.fixtures import tiny_models
from edit_core.bank import init_bank
from edit_core.comfyui.model import model_spec
from edit_core.comfyui.patcher import EditOptions, apply_edit

from helpers import pixart_inputs, randomized_bank, run, sd3_inputs

OFF = EditOptions(enabled=False)


@pytest.fixture(scope="module", params=["sd35", "pixart"])
def base(request):
    if request.param == "sd35":
        return tiny_models.sd3_patcher(depth=2, mmditx_layers=(0,), qk_norm=True, seed=4, attention_gain=4.0)
    return tiny_models.pixart_patcher(hidden=96, heads=4, depth=2, seed=5, attention_gain=4.0)


@pytest.fixture(scope="module")
def bank(base):
    return randomized_bank(init_bank(model_spec(base)))


@pytest.fixture(autouse=True)
def unload_models():
    yield
    comfy.model_management.unload_all_models()


def is_sd3(patcher):
    return model_spec(patcher).family == "sd3"


def inputs_for(patcher):
    return sd3_inputs() if is_sd3(patcher) else pixart_inputs()


def sample(patcher, steps=6, seed=7):
    """A short CFG sampling run with a real ComfyUI sampler (the caches act across steps)."""
    g = torch.Generator().manual_seed(seed)
    sd3 = is_sd3(patcher)
    extra = (lambda: {"pooled_output": torch.randn(1, 2048, generator=g)}) if sd3 else dict
    pos = [[torch.randn(1, 20, 4096, generator=g), extra()]]
    neg = [[torch.randn(1, 12, 4096, generator=g), extra()]]
    latent = torch.zeros(1, 16, 20, 22) if sd3 else torch.zeros(1, 4, 34, 40)
    noise = torch.randn(latent.shape, generator=g)
    return comfy.sample.sample(patcher, noise, steps, 4.0, "euler", "simple", pos, neg, latent, seed=seed)


CACHES = {
    # start 0: the cache may reuse from the second step on; a high threshold makes it reuse.
    "EasyCache": lambda m: EasyCacheNode.execute(m, reuse_threshold=3.0, start_percent=0.0, end_percent=1.0,
                                                 verbose=False).result[0],
    "LazyCache": lambda m: LazyCacheNode.execute(m, reuse_threshold=3.0, start_percent=0.0, end_percent=1.0,
                                                 verbose=False).result[0],
}


@pytest.mark.parametrize("cache", list(CACHES))
def test_edit_and_a_core_cache_stack_in_either_order(base, bank, cache):
    add_cache = CACHES[cache]
    cached = sample(add_cache(base))
    edit_then_cache = sample(add_cache(apply_edit(base, bank)))
    cache_then_edit = sample(apply_edit(add_cache(base), bank))
    assert torch.isfinite(edit_then_cache).all()
    assert torch.equal(edit_then_cache, cache_then_edit)
    assert not torch.allclose(edit_then_cache, cached, atol=1e-4), "EDiT did not act under the cache"
    assert torch.equal(sample(add_cache(apply_edit(base, bank, OFF))), cached)
    assert torch.equal(sample(apply_edit(add_cache(base), bank, OFF)), cached)
    if cache == "LazyCache":  # a PREDICT_NOISE wrapper: it acts on every model
        assert not torch.equal(cached, sample(base)), "LazyCache reused no step: the stacking test tests nothing"


class ClassForwardPatch:
    """A forward patch as packs that copy core code install it: it calls the class's own
    forward (not whatever was patched before) and changes the result."""

    def __init__(self, diffusion_model):
        self.diffusion_model = diffusion_model

    def __call__(self, x, *args, **kwargs):
        return type(self.diffusion_model).forward(self.diffusion_model, x, *args, **kwargs) * 0.5


def add_forward_patch(patcher):
    m = patcher.clone()
    m.add_object_patch("diffusion_model.forward", ClassForwardPatch(m.get_model_object("diffusion_model")))
    return m


def add_own_wrapper(patcher):
    """An APPLY_MODEL wrapper that shifts the input latent (another pack's per-call wrapper)."""
    def shift_input(executor, x, *args, **kwargs):
        return executor(x + 0.25, *args, **kwargs)
    m = patcher.clone()
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test_shift", shift_input)
    return m


@pytest.mark.parametrize("other", [add_forward_patch, add_own_wrapper], ids=["forward_patch", "wrapper"])
def test_edit_and_another_patch_of_the_same_model_stack_in_either_order(base, bank, other):
    inputs = inputs_for(base)
    other_only = run(other(base), inputs)
    assert not torch.equal(other_only, run(base, inputs)), "the other patch changes nothing: the test tests nothing"
    edit_then_other = run(other(apply_edit(base, bank)), inputs)
    other_then_edit = run(apply_edit(other(base), bank), inputs)
    assert torch.equal(edit_then_other, other_then_edit)
    assert not torch.allclose(edit_then_other, other_only, atol=1e-3), "EDiT did not act beside the other patch"
    assert torch.equal(run(other(apply_edit(base, bank, OFF)), inputs), other_only)
    assert torch.equal(run(apply_edit(other(base), bank, OFF), inputs), other_only)
