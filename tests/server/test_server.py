"""The pack inside a real ComfyUI server process, driven over HTTP (the session's
``comfy_server``: this pack in custom_nodes/, the tiny models in models/)."""
import asyncio
import shutil

import pytest
from safetensors import safe_open

from edit_core.client.batch import Job, run_batch
from edit_core.fixtures.names import TINY_BANKS, TINY_SD35
from helpers import DISTILL_TIMEOUT, distill_graph, pack_mappings, run_graph, tiny_sd35_graph




def test_pack_imports_in_the_server_without_error(comfy_server):
    log = comfy_server.log_tail(200_000)
    lines = [line for line in log.splitlines() if "custom_nodes" in line and "ComfyUI-EDiT" in line]
    assert lines, f"the pack is not in the server's import report:\n{log[-3000:]}"
    assert not any("IMPORT FAILED" in line for line in lines), lines
    assert not [line for line in log.splitlines() if "Cannot import" in line and "ComfyUI-EDiT" in line]


def test_object_info_lists_every_node_of_the_pack(comfy_server):
    info = comfy_server.get("/object_info", timeout=120)
    classes, titles = pack_mappings()
    assert len(classes) >= 7
    for name, cls in classes.items():
        assert name in info, f"{name} missing from /object_info"
        assert info[name]["display_name"] == titles[name]
        assert info[name]["category"].startswith("EDiT/")
        assert info[name]["description"], f"{name} has no description"
        assert info[name]["output"] == list(cls.RETURN_TYPES)


def test_tiny_sd35_workflow_runs_through_post_prompt(comfy_server, tmp_path):
    result = run_graph(comfy_server, tiny_sd35_graph(), tmp_path)
    assert result.status == "success", result.message
    assert result.seconds and result.seconds > 0
    [image] = result.files
    assert (tmp_path / image.split("/")[-1]).stat().st_size > 1000


def test_bank_for_another_model_fails_with_a_clear_message(comfy_server, tmp_path):
    graph = tiny_sd35_graph()
    [loader] = [i for i, n in graph.items() if n["class_type"] == "EDiTLoader"]
    graph[loader]["inputs"]["edit_name"] = TINY_BANKS["pixart"]
    result = run_graph(comfy_server, graph, tmp_path)
    assert result.status == "error"
    assert TINY_BANKS["pixart"] in result.message and "pixart" in result.message and "sd3" in result.message, \
        result.message


def test_invalid_input_is_rejected_with_the_node_named(comfy_server, tmp_path):
    graph = tiny_sd35_graph()
    [apply] = [i for i, n in graph.items() if n["class_type"] == "ApplyEDiT"]
    graph[apply]["inputs"]["end_percent"] = 2.5
    result = run_graph(comfy_server, graph, tmp_path)
    assert result.status == "rejected"
    assert f"node {apply} (ApplyEDiT)" in result.message and "end_percent" in result.message, result.message


def test_unknown_layers_fail_with_a_clear_message(comfy_server, tmp_path):
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_SD35, "weight_dtype": "default"}},
        "2": {"class_type": "EDiTInitFromModel", "inputs": {"model": ["1", 0], "layers": "40-41", "reduction": 32,
                                                             "eta_mode": "learned", "seed": 0}},
        "3": {"class_type": "SaveEDiT", "inputs": {"edit_bank": ["2", 0], "filename": "never", "overwrite": False}},
    }
    result = run_graph(comfy_server, graph, tmp_path)
    assert result.status == "error" and "40" in result.message, result.message


def checkpoint_step(path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["step"])


@pytest.mark.slow
def test_distill_node_interrupts_with_a_checkpoint_and_resumes(comfy_server, tmp_path):
    graph, distill = distill_graph(train_steps=200)
    runs = comfy_server.base / "output" / "edit_distill"
    before = set(runs.glob("run-*/checkpoint.safetensors"))

    async def run_then_interrupt():
        job = asyncio.ensure_future(run_batch(graph, [Job(0, None, None, None, None)], [comfy_server.url], tmp_path,
                                              DISTILL_TIMEOUT, warmup=False, log=lambda s: None))
        while not set(runs.glob("run-*/checkpoint.safetensors")) - before and not job.done():
            await asyncio.sleep(0.2)  # the first periodic checkpoint: training is under way
        comfy_server.post("/interrupt", {})
        return (await job)[0]

    first = asyncio.run(run_then_interrupt())
    assert first.status == "interrupted", first.message
    [checkpoint] = set(runs.glob("run-*/checkpoint.safetensors")) - before
    stopped_at = checkpoint_step(checkpoint)
    assert 0 < stopped_at < 200

    second = run_graph(comfy_server, graph, tmp_path / "again", timeout=DISTILL_TIMEOUT)
    assert second.status == "success", second.message
    prompt_id = next(reversed(comfy_server.get("/history?max_items=1")))
    [report] = comfy_server.get(f"/history/{prompt_id}")[prompt_id]["outputs"][distill]["text"]
    assert f"resumed from the checkpoint at step {stopped_at}" in report, report
    assert checkpoint_step(checkpoint) == 200


@pytest.fixture(autouse=True)
def _cleanup_outputs(comfy_server):
    yield
    shutil.rmtree(comfy_server.base / "output" / "EDiT", ignore_errors=True)
