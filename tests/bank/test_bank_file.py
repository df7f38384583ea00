"""The EDiT bank and its safetensors file: round trip, and every way a file can be wrong."""
import json
import re
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edit_core.fixtures import tiny_models
from edit_core.bank import (DEFAULT_DESIGN, FORMAT_VERSION, EDiTError, ModelSpec, default_hparam, init_bank, load_bank,
                            save_bank, select_layers)
from edit_core.comfyui.model import model_spec
from edit_core.comfyui.patcher import apply_edit

from helpers import ORIGINAL_DESIGN, randomized_bank, run, sd3_inputs

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
    bank = init_bank(SPEC, **ORIGINAL_DESIGN)
    t = bank.tensors()
    assert torch.equal(t["joint_blocks.1.attn.cf.proj.weight"], torch.zeros_like(t["joint_blocks.1.attn.cf.proj.weight"]))
    k = t["joint_blocks.0.attn2.sc_k.weight"]
    assert k.shape == (128, 1, 3, 3) and torch.allclose(k.sum((1, 2, 3)), torch.ones(k.shape[0]))
    assert not any(".qkv_update." in name for name in t)


def test_untrained_default_bank_starts_at_the_identity_compressor():
    t = init_bank(SPEC).tensors()
    for layer in SPEC.layers:
        assert torch.equal(t[f"{layer}.sc_k.weight"], torch.ones(128, 1, 1, 1))
        assert torch.equal(t[f"{layer}.sc_v.bias"], torch.zeros(128))
        assert not any(k.startswith(f"{layer}.qkv_update.") for k in t)
    t = init_bank(SPEC, qkv_rank=8).tensors()
    for layer in SPEC.layers:
        assert t[f"{layer}.qkv_update.down"].shape == (3 * 8, 128)
        assert torch.equal(t[f"{layer}.qkv_update.up"], torch.zeros_like(t[f"{layer}.qkv_update.up"]))


def test_init_applies_the_default_design_and_keywords_override_it():
    assert DEFAULT_DESIGN == {"sc_kernel": 1, "sc_stride": 1}  # the fidelity study's design (d)
    config = init_bank(SPEC).config
    assert {key: getattr(config, key) for key in DEFAULT_DESIGN} == DEFAULT_DESIGN
    assert (config.reduction, config.cf_kernel, config.local_kernel, config.eta_mode, config.local_placement,
            config.cf_input) == (32, 3, 3, "learned", "inside", "residual")
    original = init_bank(SPEC, **ORIGINAL_DESIGN).config
    assert {key: getattr(original, key) for key in ORIGINAL_DESIGN} == ORIGINAL_DESIGN
    assert init_bank(SPEC, qkv_rank=8).config.qkv_rank == 8
    assert (init_bank(SPEC, sc_kernel=3).config.sc_kernel, init_bank(SPEC, sc_kernel=3).config.sc_stride) == (3, 1)
    assert {key: default_hparam(key) for key in DEFAULT_DESIGN} == DEFAULT_DESIGN


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
    assert json.loads(meta["hparams"]) == {"reduction": 16, "cf_kernel": 3, "sc_kernel": 1, "local_kernel": 3,
                                          "eta_mode": "ratio", "sc_stride": 1}


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
    t["joint_blocks.1.attn.sc_v.weight"] = torch.zeros(64, 1, 1, 1)
    rewrite(saved, tensors=t)
    with pytest.raises(EDiTError, match=r"joint_blocks\.1\.attn\.sc_v\.weight: expected \(128, 1, 1, 1\), found \(64, 1, 1, 1\)"):
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
    with pytest.raises(EDiTError, match=r"good\.safetensors: bank metadata field 'hparams' must be a JSON object, "
                                        r"found '\{not json'.*make this one again"):
        load_bank(saved)


def edit_hparams(meta, **changes):
    return {**meta, "hparams": json.dumps({**json.loads(meta["hparams"]), **changes})}


# Each bad metadata value is refused naming the file, the field, what was
# expected and what was found, and saying what to do.
@pytest.mark.parametrize("change,message", [
    (lambda m: {**m, "heads": "-2"}, "field 'heads' must be a whole number from 1 to 256, found '-2'"),
    (lambda m: edit_hparams(m, reduction=0), "field 'hparams.reduction' must be a whole number from 1 to 1024, "
                                             "found 0"),
    (lambda m: edit_hparams(m, sc_kernel=2), "field 'hparams.sc_kernel' must be an odd whole number from 1 to 15, "
                                             "found 2"),
    (lambda m: {**m, "layers": json.dumps(["joint_blocks.0.attn", ""])},
     "field 'layers' must be a list of sd3 attention layer names like 'joint_blocks.0.attn' or "
     "'joint_blocks.0.attn2' with block indices below depth 2, found ''"),
    (lambda m: {**m, "layers": json.dumps("joint_blocks.0.attn")},
     "field 'layers' must be a JSON list, found '\"joint_blocks.0.attn\"'"),
    (lambda m: edit_hparams(m, reduction="32"), "field 'hparams.reduction' must be a whole number .*, found '32'"),
    (lambda m: edit_hparams(m, cf_kernel=True), "field 'hparams.cf_kernel' must be an odd whole number .*, found True"),
    (lambda m: edit_hparams(m, eta_mode=None), "field 'hparams.eta_mode' must be one of learned, ratio, found None"),
    (lambda m: {**m, "training": "[1, 2]"}, r"field 'training' must be a JSON object, found '\[1, 2\]'"),
    (lambda m: {**m, "hidden_size": "１２８"}, "field 'hidden_size' must be a whole number from 1 to 16384, "
                                             "found '１２８'"),
    (lambda m: {k: v for k, v in m.items() if k != "depth"}, "field 'depth' must be a whole number from 1 to 64, "
                                                              "found None"),
    (lambda m: {**m, "heads": "3"}, r"field 'hidden_size' must be heads \(3\) x head width, a multiple of 3, "
                                    "found '128'"),
    (lambda m: {**m, "layers": json.dumps(["joint_blocks.0.attn", "joint_blocks.0.attn"])},
     "field 'layers' must be a non-empty list of distinct layer names"),
    (lambda m: {**m, "layers": json.dumps(["blocks.0.attn"])}, "field 'layers' must be a list of sd3 attention "
                                                               "layer names.*found 'blocks.0.attn'"),
    (lambda m: {**m, "family": "flux"}, "field 'family' must be one of sd3, pixart, found 'flux'"),
    (lambda m: edit_hparams(m, extra=1), "field 'hparams' must be an object with the keys cf_kernel, eta_mode, "
                                         "local_kernel, reduction, sc_kernel and optionally cf_input, "
                                         r"local_placement, qkv_rank, sc_stride, found \['extra'\]"),
], ids=["heads=-2", "reduction=0", "sc_kernel=2", "empty-layer-name", "layers-not-a-list", "reduction-a-string",
        "kernel-a-bool", "eta_mode-null", "training-a-list", "full-width-digits", "no-depth", "heads-not-dividing",
        "duplicate-layers", "layer-of-another-family", "unknown-family", "unknown-hparam"])
def test_refuses_bad_metadata_values_naming_file_field_expected_and_found(saved, change, message):
    _, meta = read(saved)
    rewrite(saved, metadata=change(meta))
    with pytest.raises(EDiTError) as err:
        load_bank(saved)
    text = str(err.value)
    assert text.startswith(f"{saved}: bank metadata field "), text
    assert re.search(message, text), text
    assert text.endswith("The file is damaged or was not written by ComfyUI-EDiT. Use another bank, or make this one "
                         "again with EDiT Distill and Save EDiT."), text


def test_refuses_tensors_that_are_not_floating_point(saved):
    t, _ = read(saved)
    t["joint_blocks.1.attn.eta_offset"] = torch.zeros(2, dtype=torch.int32)
    rewrite(saved, tensors=t)
    with pytest.raises(EDiTError, match=r"tensors joint_blocks\.1\.attn\.eta_offset \(I32\) are not floating point"):
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
    assert select_layers(layers, "0 - 1:attn2") == ("joint_blocks.0.attn2",)
    with pytest.raises(EDiTError, match="'x-2' is not a block index"):
        select_layers(layers, "x-2")
    with pytest.raises(EDiTError, match="selects none"):
        select_layers(layers, "4-9")


@pytest.mark.parametrize("blank", ["", "   ", "\t", "all", " ALL "])
def test_blank_selection_means_all_layers(blank):
    assert select_layers(SPEC.layers, blank) == SPEC.layers


@pytest.mark.parametrize("selection,item", [
    ("１", "'１'"),        # a full-width digit: int() would take it
    ("0_1", "'0_1'"),     # int() would read 01
    ("1-", "'1-'"),
    ("1:", "'1:'"),
    ("0:attn3", "'0:attn3'"),
    ("-1", "'-1'"),
    ("0,,1", "an empty item"),
    ("0,", "an empty item"),
])
def test_malformed_layer_selections_are_refused_showing_the_syntax(selection, item):
    with pytest.raises(EDiTError) as err:
        select_layers(SPEC.layers, selection)
    assert str(err.value) == (f"layer selection {selection!r}: {item} is not a block index or range; write 'all' "
                              "(or blank), or comma-separated block indices and ranges such as '0-12, 20', each "
                              "optionally limited to one kind of layer with ':attn' or ':attn2' (e.g. '0-12:attn2')")


def test_a_backwards_range_is_refused():
    with pytest.raises(EDiTError, match="the range '1-0' runs backwards; write it low-high \\('0-1'\\)"):
        select_layers(SPEC.layers, "1-0")


@pytest.mark.parametrize("hparams,message", [
    (dict(reduction=0), "reduction 0: must be a whole number from 1 to 1024"),
    (dict(reduction=5000), "reduction 5000: must be a whole number from 1 to 1024"),
    (dict(sc_kernel=4), "sc_kernel 4: must be an odd whole number from 1 to 15"),
    (dict(local_kernel=-1), r"local_kernel -1: must be an odd whole number from 1 to 15 or 0 \(no local branch\)"),
    (dict(eta_mode="fixed"), "eta_mode 'fixed': must be one of learned, ratio"),
])
def test_init_refuses_hyper_parameters_a_bank_file_could_not_hold(hparams, message):
    with pytest.raises(EDiTError, match=message):
        init_bank(SPEC, **hparams)


@pytest.mark.parametrize("hparams", [dict(reduction=1024), dict(local_kernel=0), dict(cf_kernel=5, sc_kernel=1)])
def test_banks_at_the_limits_of_their_hyper_parameters_round_trip(tmp_path, hparams):
    save_bank(init_bank(SPEC, **hparams), tmp_path / "b.safetensors")
    assert load_bank(tmp_path / "b.safetensors").config.hparams() == {**init_bank(SPEC).config.hparams(), **hparams}


def test_init_rejects_unknown_layers():
    with pytest.raises(EDiTError, match=r"\['joint_blocks.1.attn2'\] are not attention layers"):
        init_bank(SPEC, layers=["joint_blocks.1.attn2"])


# The student-design options as bank hyper-parameters.
PIXART_SPEC = ModelSpec("pixart", 64, 2, 2, ("blocks.0.attn", "blocks.1.attn"))
OPTIONS = [dict(local_placement="outside"), dict(cf_kernel=0), dict(sc_kernel=1, sc_stride=1), dict(sc_stride=1),
           dict(cf_input="modulated"), dict(qkv_rank=8), dict(qkv_rank=256),
           dict(local_placement="outside", cf_kernel=0, sc_kernel=1, sc_stride=1, cf_input="modulated", qkv_rank=2)]


@pytest.mark.parametrize("spec", [SPEC, PIXART_SPEC], ids=["sd3", "pixart"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_student_options_round_trip(tmp_path, spec, options):
    bank = randomized_bank(init_bank(spec, **dict(ORIGINAL_DESIGN, **options)))  # each option over the original design
    save_bank(bank, tmp_path / "b.safetensors")
    loaded = load_bank(tmp_path / "b.safetensors")
    assert loaded.config == bank.config
    stored = json.loads(read(tmp_path / "b.safetensors")[1]["hparams"])
    for key, value in options.items():
        assert getattr(loaded.config, key) == value
        # PixArt's ConvFusion always reads the modulated input: its default, left out of the file.
        assert stored.get(key) == value or (key, value, spec.family) == ("cf_input", "modulated", "pixart")
    t, tl = bank.tensors(), loaded.tensors()
    assert t.keys() == tl.keys() and all(torch.equal(t[k], tl[k]) for k in t)
    layer = spec.layers[0]
    assert any(k.startswith(f"{layer}.cf.") for k in t) == (options.get("cf_kernel", 3) != 0)
    assert (f"{layer}.qkv_update.up" in t) == (options.get("qkv_rank", 0) > 0)
    if options.get("qkv_rank"):
        assert t[f"{layer}.qkv_update.down"].shape == (3 * options["qkv_rank"], spec.hidden_size)


def test_an_original_design_bank_stores_only_the_hyper_parameters_of_before(tmp_path):
    save_bank(init_bank(SPEC, **ORIGINAL_DESIGN), tmp_path / "b.safetensors")
    assert set(json.loads(read(tmp_path / "b.safetensors")[1]["hparams"])) == {
        "reduction", "cf_kernel", "sc_kernel", "local_kernel", "eta_mode"}


@pytest.mark.parametrize("spec", [SPEC, PIXART_SPEC], ids=["sd3", "pixart"])
def test_a_default_bank_round_trips_as_the_default_design(tmp_path, spec):
    bank = randomized_bank(init_bank(spec))
    save_bank(bank, tmp_path / "b.safetensors")
    stored = json.loads(read(tmp_path / "b.safetensors")[1]["hparams"])
    assert {key: stored[key] for key in DEFAULT_DESIGN} == DEFAULT_DESIGN  # stored, so it never reads as the original design
    loaded = load_bank(tmp_path / "b.safetensors")
    assert loaded.config == bank.config
    assert {key: getattr(loaded.config, key) for key in DEFAULT_DESIGN} == DEFAULT_DESIGN
    t, tl = bank.tensors(), loaded.tensors()
    assert t.keys() == tl.keys() and all(torch.equal(t[k], tl[k]) for k in t)


@pytest.mark.parametrize("spec,cf_input", [(SPEC, "residual"), (PIXART_SPEC, "modulated")], ids=["sd3", "pixart"])
def test_a_bank_written_before_the_options_loads_as_the_original_design(tmp_path, spec, cf_input):
    path = tmp_path / "old.safetensors"
    bank = randomized_bank(init_bank(spec, **ORIGINAL_DESIGN))
    save_bank(bank, path)
    tensors, meta = read(path)
    old = {"reduction": 32, "cf_kernel": 3, "sc_kernel": 3, "local_kernel": 3, "eta_mode": "learned"}
    rewrite(path, tensors, {**meta, "hparams": json.dumps(old)})  # exactly what earlier versions wrote
    config = load_bank(path).config
    assert (config.sc_kernel, config.sc_stride, config.qkv_rank, config.local_placement, config.cf_input) == (
        3, 2, 0, "inside", cf_input)
    assert config == bank.config
    assert config != init_bank(spec).config  # not today's default design


@pytest.mark.parametrize("change,message", [
    (dict(cf_kernel=2), r"'hparams.cf_kernel' must be an odd whole number from 1 to 15 or 0 \(no ConvFusion\), found 2"),
    (dict(sc_stride=3), r"'hparams.sc_stride' must be 1 or 2 \(1: no compression with sc_kernel 1\), found 3"),
    (dict(sc_stride="2"), "'hparams.sc_stride' must be 1 or 2.*, found '2'"),
    (dict(qkv_rank=-1), r"'hparams.qkv_rank' must be a whole number from 0 to 256 \(0: no low-rank q/k/v update\), "
                        "found -1"),
    (dict(qkv_rank=257), "'hparams.qkv_rank' must be a whole number from 0 to 256.*found 257"),
    (dict(qkv_rank=4.0), "'hparams.qkv_rank' must be a whole number from 0 to 256.*found 4.0"),
    (dict(local_placement="middle"), "'hparams.local_placement' must be one of inside, outside, found 'middle'"),
    (dict(cf_input="raw"), "'hparams.cf_input' must be one of residual, modulated, found 'raw'"),
    (dict(cf_input=None), "'hparams.cf_input' must be one of residual, modulated, found None"),
], ids=["cf_kernel=2", "sc_stride=3", "sc_stride-a-string", "qkv_rank=-1", "qkv_rank=257", "qkv_rank-a-float",
        "local_placement", "cf_input", "cf_input-null"])
def test_refuses_bad_student_options(saved, change, message):
    _, meta = read(saved)
    rewrite(saved, metadata=edit_hparams(meta, **change))
    with pytest.raises(EDiTError, match=message) as err:
        load_bank(saved)
    assert str(err.value).startswith(f"{saved}: bank metadata field 'hparams.")
    assert str(err.value).endswith("make this one again with EDiT Distill and Save EDiT.")


def test_refuses_a_pixart_bank_whose_convfusion_reads_the_residual_stream(tmp_path):
    path = tmp_path / "pixart.safetensors"
    save_bank(init_bank(PIXART_SPEC), path)
    _, meta = read(path)
    rewrite(path, metadata=edit_hparams(meta, cf_input="residual"))
    with pytest.raises(EDiTError, match=r"'hparams.cf_input' must be 'modulated' for pixart .*found 'residual'"):
        load_bank(path)
    with pytest.raises(EDiTError, match=r"cf_input 'residual': must be 'modulated' for pixart"):
        init_bank(PIXART_SPEC, cf_input="residual")


@pytest.mark.parametrize("hparams,message", [
    (dict(sc_stride=4), r"sc_stride 4: must be 1 or 2"),
    (dict(qkv_rank=1000), r"qkv_rank 1000: must be a whole number from 0 to 256"),
    (dict(local_placement="after"), "local_placement 'after': must be one of inside, outside"),
    (dict(cf_input="normed"), "cf_input 'normed': must be one of residual, modulated"),
])
def test_init_refuses_bad_student_options(hparams, message):
    with pytest.raises(EDiTError, match=message):
        init_bank(SPEC, **hparams)


def test_init_node_offers_the_student_options_with_the_default_design_as_default():
    from helpers import pack_mappings  # the pack imported as ComfyUI imports it
    node = pack_mappings()[0]["EDiTInitFromModel"]
    optional = node.INPUT_TYPES()["optional"]
    assert set(optional) == {"cf_kernel", "sc_kernel", "sc_stride", "local_kernel", "local_placement", "cf_input",
                             "qkv_rank"}
    assert all(spec[1]["tooltip"] for spec in optional.values())
    assert all("docs/fidelity.md" in optional[key][1]["tooltip"] for key in DEFAULT_DESIGN)
    assert {key: optional[key][1]["default"] for key in DEFAULT_DESIGN} == DEFAULT_DESIGN
    model = tiny_models.sd3_patcher(depth=2, mmditx_layers=(0,))
    widget_defaults = {k: spec[1]["default"] if "default" in spec[1] else spec[0][0] for k, spec in optional.items()}
    (bank,) = node().init(model, "all", 32, "learned", 0, **widget_defaults)
    # The pack's own copy of edit_core (imported as a package): compare values, not classes.
    assert asdict(bank.config) == asdict(init_bank(model_spec(model)).config)
    (bank,) = node().init(model, "0", 32, "learned", 0, cf_kernel=0, sc_kernel=1, sc_stride=1, local_kernel=0,
                          local_placement="outside", cf_input="modulated", qkv_rank=2)
    c = bank.config
    assert (c.layers, c.cf_kernel, c.sc_kernel, c.sc_stride, c.local_kernel, c.local_placement, c.cf_input,
            c.qkv_rank) == (("joint_blocks.0.attn", "joint_blocks.0.attn2"), 0, 1, 1, 0, "outside", "modulated", 2)
    with pytest.raises(ValueError, match="cf_kernel 2: must be an odd whole number") as err:
        node().init(model, "all", 32, "learned", 0, cf_kernel=2)
    assert type(err.value).__name__ == "EDiTError"
