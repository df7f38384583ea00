"""The EDiT bank and its safetensors file: round trip, and every way a file can be wrong."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edit_core import tiny_models
from edit_core.bank import (FORMAT_VERSION, EDiTError, ModelSpec, init_bank, load_bank, save_bank,
                            select_layers)
from edit_core.comfy_model import model_spec
from edit_core.patcher import apply_edit

from model_helpers import randomized_bank, run, sd3_inputs

SPEC = ModelSpec("sd3", 128, 2, 2, ("joint_blocks.0.attn", "joint_blocks.0.attn2", "joint_blocks.1.attn"))


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_init_is_deterministic_for_a_seed():
    a, b, c = init_bank(SPEC, seed=1), init_bank(SPEC, seed=1), init_bank(SPEC, seed=2)
    ta, tb, tc = a.tensors(), b.tensors(), c.tensors()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)


def test_untrained_bank_starts_at_zero_convfusion_and_low_pass_compressor():
    bank = init_bank(SPEC)
    t = bank.tensors()
    assert torch.equal(t["joint_blocks.1.attn.cf.proj.weight"], torch.zeros_like(t["joint_blocks.1.attn.cf.proj.weight"]))
    k = t["joint_blocks.0.attn2.sc_k.weight"]
    assert torch.allclose(k.sum((1, 2, 3)), torch.ones(k.shape[0]))


def test_round_trip_keeps_tensors_config_and_training_summary(tmp_path):
    bank = randomized_bank(init_bank(SPEC, layers=["joint_blocks.0.attn2", "joint_blocks.1.attn"], reduction=16,
                                     eta_mode="ratio"))
    path = tmp_path / "bank.safetensors"
    save_bank(bank, path, training={"steps": 12, "final_loss": 0.5})
    loaded = load_bank(path)
    assert loaded.config == bank.config
    assert loaded.config.training == {"steps": 12, "final_loss": 0.5}
    a, b = bank.tensors(), loaded.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, meta = read(path)
    assert meta["format_version"] == str(FORMAT_VERSION)
    assert json.loads(meta["layers"]) == ["joint_blocks.0.attn2", "joint_blocks.1.attn"]
    assert json.loads(meta["hparams"]) == {"reduction": 16, "cf_kernel": 3, "sc_kernel": 3, "local_kernel": 3,
                                          "eta_mode": "ratio"}


def test_saved_bank_applies_to_its_model_and_reproduces_outputs(tmp_path):
    model = tiny_models.sd3_patcher(seed=1)
    bank = randomized_bank(init_bank(model_spec(model)))
    save_bank(bank, tmp_path / "b.safetensors")
    inputs = sd3_inputs()
    assert torch.equal(run(apply_edit(model, load_bank(tmp_path / "b.safetensors")), inputs),
                       run(apply_edit(model, bank), inputs))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "good.safetensors"
    save_bank(init_bank(SPEC), path)
    return path


def rewrite(path, tensors=None, metadata=None):
    t, m = read(path)
    save_file(tensors if tensors is not None else t, str(path), metadata if metadata is not None else m)
    return path


def test_refuses_a_missing_tensor(saved):
    t, _ = read(saved)
    del t["joint_blocks.0.attn2.cf.conv.weight"]
    rewrite(saved, tensors=t)
    with pytest.raises(EDiTError, match=r"good\.safetensors.*missing tensors \['joint_blocks\.0\.attn2\.cf\.conv\.weight'\]"):
        load_bank(saved)


def test_refuses_an_unexpected_tensor(saved):
    t, _ = read(saved)
    t["joint_blocks.5.attn.cf.conv.weight"] = torch.zeros(1)
    rewrite(saved, tensors=t)
    with pytest.raises(EDiTError, match=r"unexpected tensors \['joint_blocks\.5\.attn\.cf\.conv\.weight'\]"):
        load_bank(saved)


def test_refuses_a_wrong_shape(saved):
    t, _ = read(saved)
    t["joint_blocks.1.attn.sc_v.weight"] = torch.zeros(64, 1, 3, 3)
    rewrite(saved, tensors=t)
    with pytest.raises(EDiTError, match=r"joint_blocks\.1\.attn\.sc_v\.weight: expected \(128, 1, 3, 3\), found \(64, 1, 3, 3\)"):
        load_bank(saved)


def test_refuses_non_finite_values(saved):
    t, _ = read(saved)
    t["joint_blocks.1.attn.eta_offset"] = torch.full_like(t["joint_blocks.1.attn.eta_offset"], float("nan"))
    rewrite(saved, tensors=t)
    with pytest.raises(EDiTError, match="non-finite values in joint_blocks.1.attn.eta_offset"):
        load_bank(saved)


def test_refuses_a_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(EDiTError, match=r"good\.safetensors is not a readable safetensors file"):
        load_bank(saved)


def test_refuses_a_file_that_is_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, this is not a tensor file")
    with pytest.raises(EDiTError, match="not a readable safetensors file"):
        load_bank(path)


def test_refuses_a_foreign_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"x_embedder.proj.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(EDiTError, match=r"model\.safetensors is not an EDiT bank.*format None"):
        load_bank(path)


def test_refuses_a_newer_format_version(saved):
    _, meta = read(saved)
    rewrite(saved, metadata={**meta, "format_version": str(FORMAT_VERSION + 1)})
    with pytest.raises(EDiTError, match=f"format version {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}"):
        load_bank(saved)


def test_refuses_malformed_metadata(saved):
    _, meta = read(saved)
    rewrite(saved, metadata={**meta, "hparams": "{not json"})
    with pytest.raises(EDiTError, match="metadata is incomplete or malformed"):
        load_bank(saved)


def test_refuses_a_missing_file(tmp_path):
    with pytest.raises(EDiTError, match="not found"):
        load_bank(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("other,expected", [
    (lambda: tiny_models.sd3_patcher(depth=3, mmditx_layers=(0,)), "hidden 128, 2 heads, depth 2.*hidden 192, 3 heads, depth 3"),
    (lambda: tiny_models.pixart_patcher(hidden=128, heads=2, depth=2), "it is for sd3.*the model is pixart"),
    (lambda: tiny_models.sd3_patcher(mmditx_layers=()), "layers this model does not have: joint_blocks.0.attn2"),
])
def test_refuses_a_bank_for_another_model_and_patches_nothing(tmp_path, other, expected):
    path = tmp_path / "sd35.safetensors"
    save_bank(init_bank(SPEC), path)
    model = other()
    with pytest.raises(EDiTError, match=r"sd35\.safetensors was made for a different model|sd35\.safetensors has layers") as err:
        apply_edit(model, load_bank(path))
    assert err.match(expected)
    assert model.object_patches == {} and model.additional_models == {}


def test_select_layers():
    layers = SPEC.layers
    assert select_layers(layers, "all") == layers
    assert select_layers(layers, "0") == ("joint_blocks.0.attn", "joint_blocks.0.attn2")
    assert select_layers(layers, "0-1:attn") == ("joint_blocks.0.attn", "joint_blocks.1.attn")
    assert select_layers(layers, " 1, 0:attn2 ") == ("joint_blocks.0.attn2", "joint_blocks.1.attn")
    with pytest.raises(EDiTError, match="'x-2' is not a block index"):
        select_layers(layers, "x-2")
    with pytest.raises(EDiTError, match="selects none"):
        select_layers(layers, "4-9")


def test_init_rejects_unknown_layers():
    with pytest.raises(EDiTError, match=r"\['joint_blocks.1.attn2'\] are not attention layers"):
        init_bank(SPEC, layers=["joint_blocks.1.attn2"])
