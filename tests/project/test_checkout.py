"""The tests run from any checkout folder, including the README's install: `ComfyUI-EDiT`
(not an importable name) inside `ComfyUI/custom_nodes/`. pytest must never import the pack's
root __init__.py, which only ComfyUI's custom-node loader can import."""
import os
import shutil
import subprocess
import sys

from helpers import COMFYUI_DIR, REPO

LEFT_OUT = (".git", ".host", ".compat", "results", "__pycache__", ".pytest_cache")


def test_tests_run_in_a_hyphenated_checkout_inside_custom_nodes(tmp_path):
    pack = tmp_path / "ComfyUI" / "custom_nodes" / "ComfyUI-EDiT"
    shutil.copytree(REPO, pack, ignore=shutil.ignore_patterns(*LEFT_OUT))
    env = dict(os.environ, EDIT_COMFYUI_DIR=str(COMFYUI_DIR))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/attention/test_functional.py",
                          "-k", "zero_query"], cwd=pack, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout, run.stdout
