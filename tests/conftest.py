"""Shared test set-up: fresh random inputs with a reported seed, and the real ComfyUI host.

Every run draws a new seed (printed in the header; set EDIT_TEST_SEED to replay one).
The ComfyUI host is the checkout that ``scripts/host.sh`` installed under .host/ComfyUI,
or the one EDIT_COMFYUI_DIR points at.
"""
import os
import random
import sys
import zlib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COMFYUI_DIR = Path(os.environ.get("EDIT_COMFYUI_DIR", REPO / ".host" / "ComfyUI")).resolve()
SEED = int(os.environ.get("EDIT_TEST_SEED", random.SystemRandom().randrange(2**31)))

# ComfyUI first: its top-level ``nodes`` module must win over this pack's ``nodes/`` folder.
sys.path[:0] = [str(COMFYUI_DIR), str(REPO)]
from edit_core.comfyui.env import setup_comfy  # noqa: E402

setup_comfy(COMFYUI_DIR)


def pytest_report_header(config):
    return [f"EDIT_TEST_SEED={SEED}", f"ComfyUI host: {COMFYUI_DIR}"]


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Seed torch per test from the run's seed and the test's name: fresh each run, replayable."""
    torch.manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory):
    """A ComfyUI models folder holding the built-in tiny models (written once per session)."""
    from edit_core.fixtures.tiny_models import write_tiny_models
    models = tmp_path_factory.mktemp("models")
    write_tiny_models(models)
    return models


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_models_dir):
    """A real ComfyUI server (its own process) with this pack in custom_nodes/ and the tiny
    models; one per test session."""
    from edit_core.client.server import ComfyServer
    server = ComfyServer(tmp_path_factory.mktemp("comfy_base"), comfyui_dir=COMFYUI_DIR, models=tiny_models_dir)
    with server:
        yield server


def pytest_collection_modifyitems(items):
    """A test on the session's ComfyUI server is a `server` test, whichever file it is in."""
    for item in items:
        if "comfy_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)
