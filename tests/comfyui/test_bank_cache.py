"""What applying a bank makes once (its ModelPatcher, its compiled layers) is reused while the
bank lives and dies with it."""
import gc
import weakref

from edit_core.bank import init_bank
from edit_core.comfyui.model import model_spec
from edit_core.comfyui.patcher import BANK_KEY, EditOptions, apply_edit
from edit_core.fixtures import tiny_models


def _bank_patcher(patched):
    [bank_patcher] = patched.get_additional_models_with_key(BANK_KEY)
    return bank_patcher


def _block_layers(patched):
    return [patch.attn for patch in patched.object_patches.values()]


def test_applying_a_bank_again_reuses_its_model_patcher_and_compiled_layers():
    base = tiny_models.sd3_patcher(depth=2, mmditx_layers=(0,), qk_norm=True, seed=4)
    bank = init_bank(model_spec(base))
    options = EditOptions(compile_backend="eager")
    first, second = apply_edit(base, bank, options), apply_edit(base, bank, options)
    assert _bank_patcher(first) is _bank_patcher(second)
    assert all(a is b for a, b in zip(_block_layers(first), _block_layers(second), strict=True))
    assert all(a is bank.layer(f"joint_blocks.{i}.attn")
               for i, a in enumerate(_block_layers(apply_edit(base, bank))))


def test_a_bank_applied_to_models_is_freed_with_what_was_made_for_it():
    base = tiny_models.pixart_patcher(depth=2, seed=4)
    bank = init_bank(model_spec(base))
    patched = [apply_edit(base, bank), apply_edit(base, bank, EditOptions(compile_backend="eager"))]
    bank_alive, patcher_alive = weakref.ref(bank), weakref.ref(_bank_patcher(patched[0]))
    del bank, patched
    gc.collect()
    assert bank_alive() is None and patcher_alive() is None
