"""The distillation and bank settings are declared once; the flags and widgets made from them
agree with DistillConfig and init_bank."""
import dataclasses

import pytest

from edit_core.bank import DEFAULT_DESIGN, EDiTError, default_hparam
from edit_core.bank import options as bank_options
from edit_core.distill.__main__ import build_parser
from edit_core.distill.config import SETTINGS, DistillConfig
from edit_core.util.settings import values_from, widgets

REQUIRED = ["--model", "m.safetensors", "--output", "out.safetensors"]


def test_every_config_field_is_a_flag_whose_default_is_the_field_default():
    args = build_parser().parse_args(REQUIRED)
    assert [s.name for s in SETTINGS] == [f.name for f in dataclasses.fields(DistillConfig)]
    assert DistillConfig(**values_from(SETTINGS, vars(args))) == DistillConfig()


def test_flags_build_the_config_they_name():
    args = build_parser().parse_args(REQUIRED + ["--resolutions", "512,768x512", "--seeds", "3", "4", "--lr", "0.01",
                                                 "--mode", "e2e", "--layers-per-step", "2"])
    config = DistillConfig(**values_from(SETTINGS, vars(args)))
    assert (config.resolutions, config.seeds, config.lr, config.mode, config.layers_per_step) == (
        ((512, 512), (768, 512)), (3, 4), 0.01, "e2e", 2)


def test_widgets_use_their_own_names_and_build_the_config():
    shown = [s.name for s in SETTINGS if s.node is not None]
    inputs = widgets(SETTINGS, shown, choices={"sampler": ["euler", "heun"]})
    assert inputs["sampler_name"] == (["euler", "heun"], {"default": "euler"})
    assert inputs["learning_rate"][0] == "FLOAT" and inputs["seeds"] == (
        "STRING", {"default": "0,1", "tooltip": "Noise seeds per prompt for the teacher data."})
    config = DistillConfig(**values_from(SETTINGS, {name: spec[1]["default"] for name, spec in inputs.items()},
                                         by="widget"))
    assert config == DistillConfig(seeds=(0, 1))


def test_bank_flags_default_to_the_design_and_leave_cf_input_to_the_family():
    options = bank_options.options_from_flags(build_parser().parse_args(REQUIRED))
    assert options == {key: default_hparam(key) for key in options} and "cf_input" not in options
    assert {key: options[key] for key in DEFAULT_DESIGN} == DEFAULT_DESIGN
    with pytest.raises(EDiTError, match="--cf-kernel 2: must be an odd"):
        bank_options.options_from_flags(build_parser().parse_args(REQUIRED + ["--cf-kernel", "2"]))


def test_bank_widgets_and_flags_spell_the_family_s_default_the_same():
    inputs = widgets(bank_options.SETTINGS, ["cf_input", "sc_stride"])
    assert inputs["cf_input"][0] == ["default", "residual", "modulated"] and inputs["sc_stride"][0] == "INT"
    assert bank_options.options_from_widgets({"cf_input": "default"}) == {"cf_input": None}
    assert bank_options.options_from_widgets({}) == {"cf_input": None}
    assert bank_options.options_from_widgets({"cf_input": "modulated"}) == {"cf_input": "modulated"}
    flags = build_parser().parse_args(REQUIRED + ["--cf-input", "default"])
    assert "cf_input" not in bank_options.options_from_flags(flags)
