"""The EDiT weight bank: the per-layer EDiT modules for one model, and its safetensors file.

A bank is built from a ``BankConfig`` (model family, width, heads, depth, converted layers,
hyper-parameters). Its tensors are named like the model's layers they replace, e.g.
``joint_blocks.3.attn.cf.conv.weight`` or ``blocks.7.attn.sc_k.weight``.

- ``families``: what a bank knows of each model family (layer names, hybrid layers, cf_input)
- ``design``: the hyper-parameters' rules and defaults, ModelSpec, BankConfig
- ``bank``: EDiTBank, init_bank, and the check that a bank fits a model
- ``file``: the file's name rules, save_bank, and load_bank, which validates before allocating
- ``selection``: the layer-selection syntax ('0-12:attn2, 20')

No ComfyUI here. The names below are the package's API.
"""
from ..errors import EDiTError
from .bank import EDiTBank, check_bank_fits, init_bank, layer_kind, new_bank_config
from .design import (DEFAULT_DESIGN, ORIGINAL_HPARAMS, MAX_QKV_RANK, BankConfig, ModelSpec, default_hparam,
                     hparam_problem)
from .file import FORMAT_VERSION, bank_file_stem, load_bank, save_bank
from .selection import parse_layer_selection, select_layers

__all__ = [
    "BankConfig", "DEFAULT_DESIGN", "EDiTBank", "EDiTError", "FORMAT_VERSION", "ORIGINAL_HPARAMS", "MAX_QKV_RANK",
    "ModelSpec", "bank_file_stem", "check_bank_fits", "default_hparam", "hparam_problem", "init_bank", "layer_kind",
    "load_bank", "new_bank_config", "parse_layer_selection", "save_bank", "select_layers",
]
