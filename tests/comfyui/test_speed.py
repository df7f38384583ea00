"""EDiT Speed Test: the bank is loaded with the model and stays on its device while timed."""
import torch

import comfy.model_management

from edit_core.fixtures import tiny_models
from edit_core.bank import init_bank
from edit_core.comfyui.model import model_spec
from edit_core.comfyui.patcher import BANK_KEY, STUDENT, TEACHER, apply_edit
from edit_core.comfyui.speed import speed_test

from helpers import randomized_bank


def test_speed_test_times_with_the_bank_loaded_on_the_model_device():
    base = tiny_models.sd3_patcher(depth=2, mmditx_layers=(0,), qk_norm=True, seed=4)
    bank = randomized_bank(init_bank(model_spec(base)))
    patched = apply_edit(base, bank)
    [bank_patcher] = patched.get_additional_models_with_key(BANK_KEY)
    comfy.model_management.unload_all_models()  # no sampler ran first
    device = torch.device(patched.load_device)
    seen = []

    def after_each_run():
        loaded = comfy.model_management.loaded_models()
        seen.append((any(m is bank_patcher for m in loaded), {p.device for p in bank.parameters()}))

    try:
        report = speed_test(patched, 128, 128, batch=1, prompt_tokens=8, repeats=2, warmup=1, on_run=after_each_run)
    finally:
        comfy.model_management.unload_all_models()
    assert len(seen) == 2 * (2 + 1)
    assert all(loaded and devices == {device} for loaded, devices in seen), seen
    assert len(report.times[TEACHER]) == len(report.times[STUDENT]) == 2
