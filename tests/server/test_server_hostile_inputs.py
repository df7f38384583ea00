"""Hostile and careless inputs over HTTP on the real server: Save EDiT file names,
a memory-bomb bank in models/edit, malformed layer selections. The user sees the pack's
error, in /history for errors while running, in POST /prompt's answer for rejected inputs."""
import time
import uuid

import pytest

from edit_core.fixtures.names import TINY_SD35
from edit_core.client.tiny_workflow import use_tiny_models
from edit_core.client.workflow import load_graph, nodes_of
from helpers import BOMBS, REPO, write_bomb



def execution_error(server, graph, seconds=300):
    """Queue ``graph`` and return the execution_error message of its /history entry."""
    status, body = server.post("/prompt", {"prompt": graph, "client_id": "hardening"})
    assert status == 200, body
    prompt_id, deadline = body["prompt_id"], time.monotonic() + seconds
    while prompt_id not in (history := server.get(f"/history/{prompt_id}")):
        assert time.monotonic() < deadline, f"prompt {prompt_id} did not finish in {seconds} s"
        time.sleep(0.2)
    messages = dict(history[prompt_id]["status"]["messages"])
    assert "execution_error" in messages, history[prompt_id]["status"]
    return messages["execution_error"]


def save_graph(filename):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_SD35, "weight_dtype": "default"}},
        "2": {"class_type": "EDiTInitFromModel", "inputs": {"model": ["1", 0], "layers": "all", "reduction": 32,
                                                             "eta_mode": "learned", "seed": 0}},
        "3": {"class_type": "SaveEDiT", "inputs": {"edit_bank": ["2", 0], "filename": filename, "overwrite": False}},
    }


@pytest.mark.parametrize("filename,message", [
    ("bank\x00name", "Save EDiT: the file name 'bank\\x00name' contains '\\x00'; give a plain file name (no folders "
                     "or control characters): the bank is saved in models/edit"),
    ("b" * 250, f"Save EDiT: the file name {'b' * 40!r}... is 250 bytes long; give a name of at most 200 bytes"),
    ("../../../escaped", "Save EDiT: the file name '../../../escaped' contains '/'; give a plain file name"),
], ids=["nul-byte", "250-characters", "path-trick"])
def test_save_edit_refuses_a_bad_file_name_before_writing(comfy_server, filename, message):
    edit_dir = comfy_server.base / "models" / "edit"
    before = sorted(p.name for p in edit_dir.iterdir())
    error = execution_error(comfy_server, save_graph(filename))
    assert error["node_id"] == "3" and error["node_type"] == "SaveEDiT"
    assert error["exception_type"].endswith("EDiTError")
    assert error["exception_message"].startswith(message), error["exception_message"]
    assert sorted(p.name for p in edit_dir.iterdir()) == before
    assert not list(comfy_server.base.rglob("escaped*"))


@pytest.mark.parametrize("name", list(BOMBS))
def test_loader_refuses_a_memory_bomb_bank_naming_the_file(comfy_server, name):
    bomb = write_bomb(comfy_server.base / "models" / "edit" / f"bomb-{name}-{uuid.uuid4().hex[:8]}.safetensors",
                      BOMBS[name])
    try:
        graph = {"1": {"class_type": "EDiTLoader", "inputs": {"edit_name": bomb.name}},
                 "2": {"class_type": "SaveEDiT", "inputs": {"edit_bank": ["1", 0], "filename": "never",
                                                             "overwrite": False}}}
        error = execution_error(comfy_server, graph)
    finally:
        bomb.unlink()
    assert error["node_type"] == "EDiTLoader" and error["exception_type"].endswith("EDiTError")
    assert bomb.name in error["exception_message"]
    assert error["exception_message"].rstrip().endswith("Use another bank, or make this one again with EDiT Distill and "
                                               "Save EDiT.")


@pytest.mark.parametrize("layers", ["１", "0_1", "1-", "1:"])
def test_a_malformed_layer_selection_is_rejected_when_queued(comfy_server, layers):
    graph = use_tiny_models(load_graph(REPO / "workflows" / "api" / "sd35_medium_edit.json"), size=256, steps=2)
    [apply] = nodes_of(graph, "ApplyEDiT")
    graph[apply]["inputs"]["layers"] = layers
    status, body = comfy_server.post("/prompt", {"prompt": graph, "client_id": "test"})
    assert status == 400
    [error] = body["node_errors"][apply]["errors"]
    assert error["details"].startswith(f"layers - layer selection {layers!r}: {layers!r} is not a block index or "
                                       "range; write 'all' (or blank)"), error
