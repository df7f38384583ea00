"""The built-in tiny models are real models: every tensor comes from the seed, the files are
the same bytes for a seed, and the tiny VAEs decode latents to real images."""
import pytest
import torch
from safetensors.torch import load_file

import comfy.sd
from edit_core.tiny_models import taesd_state_dict, write_tiny_models
from edit_core.tiny_names import TINY_VAE4, TINY_VAE16


@pytest.fixture(scope="module")
def two_writes(tmp_path_factory):
    return [write_tiny_models(tmp_path_factory.mktemp(f"write{k}"), seed=3) for k in (1, 2)]


def test_two_writes_with_the_same_seed_are_the_same_bytes(two_writes):
    first, second = two_writes
    assert sorted(first) == sorted(second) and len(first) == 6
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name


def test_another_seed_gives_other_weights(two_writes, tmp_path):
    other = taesd_state_dict(16, seed=4)
    ours = load_file(str(two_writes[0][TINY_VAE16]))
    assert not torch.equal(other["taesd_decoder.1.weight"], ours["taesd_decoder.1.weight"])


def test_every_tensor_is_finite_and_of_sane_size(two_writes):
    for name, path in two_writes[0].items():
        for key, tensor in load_file(str(path)).items():
            t = tensor.float()
            assert torch.isfinite(t).all(), f"{name}: {key} is not finite"
            assert t.abs().max() < 100, f"{name}: {key} has values up to {t.abs().max():.3g}"


@pytest.mark.parametrize("vae_name, channels", [(TINY_VAE16, 16), (TINY_VAE4, 4)])
def test_the_tiny_vae_decodes_latents_to_images_that_follow_them(two_writes, vae_name, channels):
    vae = comfy.sd.VAE(sd=load_file(str(two_writes[0][vae_name])))
    latents = torch.randn(2, channels, 16, 16, generator=torch.Generator().manual_seed(0))
    images = vae.decode(latents)
    assert images.shape == (2, 128, 128, 3)
    assert torch.isfinite(images).all()
    assert 0.2 < images.mean() < 0.8 and images.std() > 0.05, (images.mean(), images.std())
    assert (images[0] - images[1]).abs().mean() > 0.02, "two different latents decode to the same image"
