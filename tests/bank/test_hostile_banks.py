"""Hostile and careless inputs outside distillation: memory-bomb banks, bad
Save EDiT file names. Each is refused with an EDiTError naming the file or input."""
import os
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from edit_core.bank import EDiTError, bank_file_stem, init_bank, load_bank, save_bank
from edit_core.util.memory import PeakTensorMemory
from helpers import BOMBS, SPEC, write_bomb

def resident_peak_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def resident_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure(fn):
    """(seconds, peak new tensor bytes, peak Python bytes, peak extra resident bytes or None)
    of one call."""
    try:  # reset the kernel's peak-RSS mark (Linux), so the peak below is this call's own
        Path("/proc/self/clear_refs").write_text("5")
        rss_before = resident_kib()
    except OSError:
        rss_before = None
    tracemalloc.start()
    start = time.perf_counter()
    with PeakTensorMemory() as tensors:
        fn()
    seconds = time.perf_counter() - start
    _, python_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_extra = None if rss_before is None else (resident_peak_kib() - rss_before) * 1024
    return seconds, tensors.peak, python_peak, rss_extra


def refuse(path):
    with pytest.raises(EDiTError) as err:
        load_bank(path)
    refuse.message = str(err.value)


@pytest.mark.parametrize("name", list(BOMBS))
def test_memory_bomb_bank_is_refused_fast_without_allocating(tmp_path, name):
    path = write_bomb(tmp_path / f"bomb-{name}.safetensors", BOMBS[name])
    assert path.stat().st_size < 200_000
    # Load a good bank first: the first shape check in a process imports PyTorch's meta
    # kernels (seconds, tens of MB of Python objects), a one-time cost unrelated to the file.
    save_bank(init_bank(SPEC), tmp_path / "good.safetensors")
    load_bank(tmp_path / "good.safetensors")
    seconds, tensor_peak, python_peak, rss_extra = measure(lambda: refuse(path))
    print(f"{name}: refused in {seconds * 1000:.1f} ms, tensors {tensor_peak} B, python {python_peak} B, "
          f"resident peak +{rss_extra} B: {refuse.message}")
    assert str(path) in refuse.message
    assert seconds < 1.0
    assert tensor_peak < 50 * 2**20 and python_peak < 50 * 2**20
    if rss_extra is not None:
        assert rss_extra < 50 * 2**20


def test_the_memory_measures_see_a_real_bank_being_built():
    """The control for the test above: building a bank of about 48 MB shows. (The tensor
    measure sees only the largest parameters here: it follows tensor objects, and a module
    wraps each new tensor in an nn.Parameter and drops it; the resident size sees it all.)
    It runs in a fresh process: in this one, memory freed by earlier tests is reused without
    the resident size growing."""
    code = ("import sys; sys.path[:0] = ['tests', 'tests/bank']; from edit_core.comfyui.env import setup_comfy; "
            "setup_comfy(); import test_hostile_banks as t; "
            "from edit_core.bank import ModelSpec, init_bank; "
            "spec = ModelSpec('sd3', 2048, 16, 8, tuple(f'joint_blocks.{i}.attn' for i in range(8))); "
            "_, tensor_peak, _, rss_extra = t.measure(lambda: init_bank(spec)); print(tensor_peak, rss_extra)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], env=os.environ,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    tensor_peak, rss_extra = out.stdout.split()[-2:]
    print(f"building a 48 MB bank: tensors {tensor_peak} B, resident peak +{rss_extra} B")
    assert int(tensor_peak) > 4 * 2**20
    if rss_extra != "None":
        assert int(rss_extra) > 40 * 2**20


def test_memory_bomb_messages_say_what_is_wrong(tmp_path):
    messages = {name: str(pytest.raises(EDiTError, load_bank, write_bomb(tmp_path / f"{name}.safetensors", claim)).value)
                for name, claim in BOMBS.items()}
    assert "field 'depth' must be a whole number from 1 to 64, found '200'" in messages["200-layers"]
    assert "tensors of the wrong shape for sd3, hidden 16384, 128 heads, depth 2, 3 layers: " in messages["hidden-16384"]
    assert "joint_blocks.0.attn.cf.conv.weight: expected (512, 16384, 3, 3), found (4, 128, 3, 3)" \
        in messages["hidden-16384"]
    assert "does not match its own config (sd3, hidden 16384, 128 heads, depth 64, 128 layers): missing tensors" \
        in messages["64-blocks-hidden-16384"]
    assert all(m.startswith(str(tmp_path)) and m.endswith(
        "Use another bank, or make this one again with EDiT Distill and Save EDiT.") for m in messages.values())


@pytest.mark.parametrize("filename,message", [
    ("bank\x00.safetensors", r"contains '\\x00'; give a plain file name \(no folders or control characters\)"),
    ("a" * 250, r"'a{40}'\.\.\. is 250 bytes long; give a name of at most 200 bytes"),
    ("é" * 101, r"is 202 bytes long"),
    ("../../escape", r"contains '/'; give a plain file name"),
    ("/tmp/abs", r"contains '/'"),
    ("..\\up", r"contains '\\\\'"),
    ("C:bank", r"contains ':'"),
    ("line\nbreak", r"contains '\\n'"),
    (".hidden", r"starts with a dot"),
    ("..", r"starts with a dot"),
])
def test_save_edit_refuses_bad_file_names(filename, message):
    with pytest.raises(EDiTError, match=r"^Save EDiT: the file name .*" + message):
        bank_file_stem(filename)


@pytest.mark.parametrize("filename,stem", [
    ("my bank", "my bank"), (" sd35-v2.safetensors ", "sd35-v2"), ("", "edit_bank"), ("   ", "edit_bank"),
    ("ü" * 100, "ü" * 100), ("x" * 200, "x" * 200),
])
def test_save_edit_keeps_plain_file_names(filename, stem):
    assert bank_file_stem(filename) == stem
