"""The training step's memory rules, held against plain references: no second copy of the
weights, checkpointed end-to-end = plain end-to-end, per-layer backward = one backward."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import comfy.model_management

from edit_core.fixtures import tiny_models
from edit_core.bank import init_bank
from edit_core.comfyui.model import conditioning_dims, model_spec
from edit_core.distill.config import DistillConfig
from edit_core.distill.examples import layer_subset
from edit_core.distill.losses import Example, StudentLoss, train_example
from edit_core.distill.student import trainable_weights, trainer_model
from edit_core.distill.train import distill, trainable_copy
from edit_core.comfyui.patcher import TEACHER, call_model


def example_for(model, seed=0):
    dims = conditioning_dims(model)
    [[context, extra]] = tiny_models.random_conditioning("a prompt", 0, 24, *dims)
    conds = {"c_crossattn": context}
    if "pooled_output" in extra:
        conds["y"] = extra["pooled_output"]
    channels = model.get_model_object("latent_format").latent_channels
    size = 16 if model_spec(model).family == "sd3" else 48  # PixArt's position embedding wants >= 384 px
    x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return Example(x, torch.tensor([0.6]), conds)


def bank_grads(model, mode, checkpoint_blocks=True, layers=None, per_layer=True):
    bank = trainable_copy(init_bank(model_spec(model), seed=3), "cpu")
    trainer = trainer_model(model, bank, checkpoint_blocks)
    comfy.model_management.load_models_gpu([trainer])
    loss_fn = StudentLoss(bank, trainer)
    example = example_for(model)
    if per_layer:
        parts = train_example(loss_fn, example, mode, 0.5, layers)
    else:  # the reference: every layer's loss on the teacher's inputs, summed, one backward
        captured = {}
        with torch.no_grad():
            call_model(trainer, example.x, example.t, example.conds, TEACHER,
                       lambda name, grid, tensors: captured.__setitem__(name, (grid, dict(tensors))))
        names = layers or bank.config.layers
        losses = [loss_fn.layer_loss(n, captured[n][1], captured[n][0]) for n in names]
        (0.5 * torch.stack(losses).mean()).backward()
        parts = {"loss": float(torch.stack(losses).mean().detach())}
    return {k: None if p.grad is None else p.grad.clone() for k, p in bank.named_parameters()}, parts


TEACHERS = {"sd3": lambda: tiny_models.sd3_patcher(seed=1, depth=3, mmditx_layers=(0, 1)),
            "pixart": lambda: tiny_models.pixart_patcher(hidden=144, heads=2, depth=3, seed=1)}


@pytest.fixture(scope="module", params=list(TEACHERS))
def model(request):
    return TEACHERS[request.param]()


def test_layerwise_backward_per_layer_equals_one_backward_of_all_layers(model):
    per_layer, parts = bank_grads(model, "layerwise")
    reference, ref_parts = bank_grads(model, "layerwise", per_layer=False)
    assert abs(parts["loss"] - ref_parts["loss"]) < 1e-6 * ref_parts["loss"]
    for k, g in reference.items():
        assert g is not None and torch.allclose(per_layer[k], g, rtol=1e-5, atol=1e-9), k


def test_checkpointed_end_to_end_gives_the_plain_gradients(model):
    checkpointed, parts = bank_grads(model, "e2e", checkpoint_blocks=True)
    plain, plain_parts = bank_grads(model, "e2e", checkpoint_blocks=False)
    assert parts == plain_parts
    for k, g in plain.items():
        assert g is not None and torch.allclose(checkpointed[k], g, rtol=1e-5, atol=1e-9), k


@pytest.mark.parametrize("mode", ["layerwise", "e2e"])
def test_a_layer_subset_trains_only_those_layers(model, mode):
    layers = model_spec(model).layers
    subset = layer_subset(layers, 2, seed=0, step=7)
    assert len(subset) == 2 and subset == layer_subset(layers, 2, seed=0, step=7)  # a function of the step
    grads, parts = bank_grads(model, mode, layers=subset)
    assert set(subset) <= set(parts)
    def moved(layer):  # some gradient reaches the layer (zero-initialised parts may get none)
        return any(g is not None and bool(g.abs().sum() > 0) for k, g in grads.items() if k.startswith(f"layers.{layer}."))

    for layer in layers:
        if layer in subset:
            assert moved(layer), layer
        elif mode == "layerwise":  # end-to-end: the output loss reaches the other layers too
            assert not moved(layer), layer
    expected = set(subset) | {"loss"} | ({"output"} if mode == "e2e" else set())
    assert set(parts) == expected, parts


def test_inference_mode_weights_become_trainable_without_a_second_copy():
    """ComfyUI loads models under inference_mode. trainable_weights swaps each weight for a
    normal tensor one at a time: the extra memory at any moment (new tensors made minus
    old ones freed) stays within the largest parameter."""
    with torch.inference_mode():
        model = tiny_models.sd3_patcher(seed=1)
    module = model.model
    tensors = [t for t in list(module.parameters()) + list(module.buffers())]
    assert tensors and all(t.is_inference() for t in tensors)
    sizes = [t.untyped_storage().nbytes() for t in tensors]
    counter = StoragesMade()
    for t, size in zip(tensors, sizes):
        weakref.finalize(t, counter.freed, size)
    del tensors, t
    with counter:
        replaced = trainable_weights(module)
    assert replaced == len(sizes)
    assert not any(p.is_inference() for p in module.parameters())
    assert counter.live == 0, "every old weight was freed: no second copy remains"
    assert 0 < counter.peak <= max(sizes), (counter.peak, max(sizes))


class StoragesMade(TorchDispatchMode):
    """Bytes of the storages ops create (kept: they become the new weights) minus the bytes
    of the old weights freed so far (``freed``, from their finalizers); and its peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def freed(self, size):
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                self.seen.add(t.untyped_storage().data_ptr())
                self.live += t.untyped_storage().nbytes()
                self.peak = max(self.peak, self.live)
        return out


def test_distilling_a_model_loaded_in_inference_mode_gives_the_same_bank(tmp_path):
    dims_model = tiny_models.sd3_patcher(seed=1)
    with torch.inference_mode():
        inference_model = tiny_models.sd3_patcher(seed=1)
    dims = conditioning_dims(dims_model)
    cond = lambda text: tiny_models.random_conditioning(text, 0, 24, *dims)  # noqa: E731
    config = DistillConfig(resolutions=((128, 128),), seeds=(0,), sample_steps=2, cfg=3.0, train_steps=4,
                           batch_size=2, checkpoint_every=100)
    plain = distill(dims_model, [cond("a")], cond(""), config, tmp_path / "a")
    with torch.inference_mode():  # as a ComfyUI node runs
        node = distill(inference_model, [cond("a")], cond(""), config, tmp_path / "b")
    for k, v in plain.bank.tensors().items():
        assert torch.equal(v, node.bank.tensors()[k]), k
