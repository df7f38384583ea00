"""The example workflows: UI files and their API twins agree, every node exists, ComfyUI's
template browser lists them, and every API workflow runs on a real server with the tiny
models substituted."""
import asyncio
import importlib.util
import io
import json
import urllib.request

import numpy as np
import pytest
from PIL import Image

from edit_core.client.batch import Job, run_batch
from edit_core.client.tiny_workflow import use_tiny_models
from edit_core.client.ui_format import ui_to_api
from edit_core.client.workflow import WorkflowError, load_graph, with_settings
from helpers import REPO, assert_real_image

UI = sorted((REPO / "workflows").glob("*.json"))
NAMES = [p.stem for p in UI]


def test_every_ui_workflow_has_an_api_twin_and_vice_versa():
    assert len(NAMES) >= 4
    assert sorted(p.stem for p in (REPO / "workflows" / "api").glob("*.json")) == NAMES


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info", timeout=120)


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_its_api_twin_and_uses_existing_nodes(name, object_info):
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    api = load_graph(REPO / "workflows" / "api" / f"{name}.json")
    assert {n["type"] for n in ui["nodes"]} - {"Note"} <= set(object_info)
    strip = lambda g: {i: {k: v for k, v in n.items() if k != "_meta"} for i, n in g.items()}  # noqa: E731
    assert strip(ui_to_api(ui, object_info)) == strip(api)
    assert any(n["type"] == "Note" for n in ui["nodes"]), "each example explains itself in a Note"


def test_template_browser_lists_the_examples(comfy_server):
    templates = comfy_server.get("/workflow_templates")
    assert sorted(templates.get("ComfyUI-EDiT", [])) == NAMES
    for name in NAMES:
        served = comfy_server.get(f"/api/workflow_templates/ComfyUI-EDiT/{name}.json")
        assert served == json.loads((REPO / "workflows" / f"{name}.json").read_text())
        # The frontend shows <name>.jpg as the template's thumbnail.
        with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/ComfyUI-EDiT/{name}.jpg") as r:
            assert r.headers["Content-Type"] == "image/jpeg"
            assert r.read() == (REPO / "workflows" / f"{name}.jpg").read_bytes()


def load_builder():
    spec = importlib.util.spec_from_file_location("build_workflows", REPO / "scripts" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_each_thumbnail_is_what_the_builder_draws_with_a_one_line_description(name):
    builder = load_builder()
    title, line, _ = builder.THUMBNAILS[name]
    assert title and line and "\n" not in line and len(line) <= 140
    path = REPO / "workflows" / f"{name}.jpg"
    image = Image.open(path)
    assert image.format == "JPEG" and image.size == builder.SIZE_PX
    assert np.asarray(image.convert("RGB"), dtype=np.float64).std() > 10, "a blank thumbnail"
    drawn = io.BytesIO()
    builder.render_thumbnail(name).save(drawn, "JPEG", quality=builder.JPEG_QUALITY)
    assert drawn.getvalue() == path.read_bytes(), "stale: run scripts/build_workflows.py --thumbnails-only"


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_on_the_tiny_models(name, comfy_server, tmp_path):
    graph = use_tiny_models(load_graph(REPO / "workflows" / "api" / f"{name}.json"), size=384, steps=2)
    [result] = asyncio.run(run_batch(graph, [Job(0, None, None, None, None)], [comfy_server.url], tmp_path, 900,
                                     warmup=False, log=lambda s: None))
    assert result.status == "success", result.message
    assert result.files, "the workflow saved no image"
    for path in result.files:
        pixels = assert_real_image(path)
        if "ImageStitch" in {n["class_type"] for n in graph.values()}:  # original | 16 px gap | EDiT
            left, right = pixels[:, :384], pixels[:, -384:]
            assert pixels.shape[1] == 2 * 384 + 16
            assert np.abs(left - right).mean() > 1e-3, "original and EDiT halves are the same image"
    assert "invalid value encountered" not in comfy_server.log_tail(10 ** 7)


def test_with_settings_sets_every_place_and_refuses_missing_ones():
    graph = load_graph(REPO / "workflows" / "api" / "sd35_original_vs_edit.json")
    g = with_settings(graph, prompt="a boat", seed=7, size=(768, 512), edit=False)
    samplers = [n for n in g.values() if n["class_type"] == "KSampler"]
    assert len(samplers) == 2 and all(n["inputs"]["seed"] == 7 for n in samplers)
    assert [n["inputs"]["text"] for i, n in g.items() if n["_meta"]["title"] == "Positive"] == ["a boat"]
    assert [n["inputs"]["text"] for i, n in g.items() if n["_meta"]["title"] == "Negative"] != ["a boat"]
    latent = next(n for n in g.values() if n["class_type"] == "EmptySD3LatentImage")["inputs"]
    assert (latent["width"], latent["height"]) == (768, 512)
    assert next(n for n in g.values() if n["class_type"] == "ApplyEDiT")["inputs"]["enabled"] is False
    assert graph != g  # a copy
    no_edit = {i: n for i, n in graph.items() if n["class_type"] != "ApplyEDiT"}
    with pytest.raises(WorkflowError, match="no place for the edit"):
        with_settings(no_edit, edit=True)


def test_load_graph_refuses_ui_format_and_foreign_json(tmp_path):
    with pytest.raises(WorkflowError, match="UI-format"):
        load_graph(REPO / "workflows" / f"{NAMES[0]}.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1}')
    with pytest.raises(WorkflowError, match="API-format"):
        load_graph(bad)
    bad.write_text("{")
    with pytest.raises(WorkflowError, match="bad.json"):
        load_graph(bad)
