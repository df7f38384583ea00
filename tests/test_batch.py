"""The batch CLI against a real ComfyUI server: A/B runs, work spread over servers (one of
them down), failures recorded while the other runs go on."""
import json

import pytest

from conftest import REPO
from edit_core.batch import main, parse_args
from edit_core.host_server import free_port

WORKFLOW = str(REPO / "workflows" / "api" / "sd35_medium_edit.json")


def results(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_ab_run_over_a_live_and_a_dead_server(comfy_server, tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    rc = main([WORKFLOW, "--tiny", "--server", dead, "--server", comfy_server.url, "--sizes", "256", "320",
               "--seeds", "3", "--prompt", "a red boat", "--ab", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = results(tmp_path)
    assert sorted(r["job"]["index"] for r in rows) == [0, 1, 2, 3]
    assert all(r["status"] == "success" and r["server"] == comfy_server.url and r["seconds"] > 0 for r in rows)
    assert {(tuple(r["job"]["size"]), r["job"]["edit"]) for r in rows} == {
        ((256, 256), True), ((256, 256), False), ((320, 320), True), ((320, 320), False)}
    for r in rows:
        assert len(r["files"]) == 1 and (tmp_path / r["files"][0].split("/")[-1]).stat().st_size > 1000
    assert "TINY" in out and "| 256x256 |" in out and "| 320x320 |" in out and "speed-up" in out


def test_failed_runs_are_recorded_and_the_others_go_on(comfy_server, tmp_path, capsys):
    # The tiny SD3.5 has position embeddings for up to 1024 px: 1088 px fails in execution.
    rc = main([WORKFLOW, "--tiny", "--server", comfy_server.url, "--sizes", "1088", "256", "--seeds", "1",
               "--no-warmup", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 1
    by_size = {tuple(r["job"]["size"]): r for r in results(tmp_path)}
    assert by_size[(1088, 1088)]["status"] == "error" and "node" in by_size[(1088, 1088)]["message"]
    assert by_size[(256, 256)]["status"] == "success"
    assert "1/2 succeeded" in captured.out


def test_a_rejected_prompt_names_the_node_and_input(comfy_server, tmp_path, capsys):
    graph = json.loads(open(WORKFLOW).read())
    apply = next(i for i, n in graph.items() if n["class_type"] == "ApplyEDiT")
    graph[apply]["inputs"]["start_percent"] = -1.0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(graph))
    rc = main([str(path), "--tiny", "--server", comfy_server.url, "--no-warmup", "--out", str(tmp_path / "o")])
    assert rc == 1
    [row] = results(tmp_path / "o")
    assert row["status"] == "rejected"
    assert f"node {apply} (ApplyEDiT)" in row["message"] and "start_percent" in row["message"]


def test_every_server_down_fails_every_job_clearly(tmp_path, capsys):
    rc = main([WORKFLOW, "--tiny", "--server", f"http://127.0.0.1:{free_port()}", "--seeds", "0", "1",
               "--out", str(tmp_path)])
    assert rc == 1
    rows = results(tmp_path)
    assert len(rows) == 2 and all(r["status"] == "server-down" for r in rows)
    assert "cannot connect" in capsys.readouterr().out


# -- bad input: one `error:` line naming the node and what is wrong, exit 2 -------------------
def broken(graph, node, change):
    graph = json.loads(json.dumps(graph))
    change(graph[node])
    return graph


GOOD = json.loads(open(WORKFLOW).read())


@pytest.mark.parametrize("content,message", [
    (broken(GOOD, "9", lambda n: n.pop("inputs")), "node 9 (KSampler) has no 'inputs' object"),
    (broken(GOOD, "9", lambda n: n.update(inputs=[1, 2])), "node 9 (KSampler) has no 'inputs' object (found a JSON list)"),
    (broken(GOOD, "9", lambda n: n["inputs"].update(model=["70", 0])),
     "node 9 (KSampler): input 'model' links to node 70, which is not in the workflow"),
    (broken(GOOD, "9", lambda n: n["inputs"].pop("steps")), "node 9 (KSampler) has no 'steps' input"),
    (broken(GOOD, "7", lambda n: n.pop("class_type")), "node 7 has no class_type: not an API-format workflow node"),
    ({"nodes": [], "links": []}, "is a UI-format workflow; batch runs need the API format"),
    ([1, 2, 3], "expected an API-format workflow, a JSON object of nodes"),
    ({}, "expected an API-format workflow, a JSON object of nodes (node id -> {\"class_type\", \"inputs\"}), "
         "found an empty object"),
    ("{not json", "not a readable JSON workflow"),
], ids=["no-inputs", "inputs-a-list", "dangling-link", "no-steps", "no-class_type", "ui-format", "a-list", "empty",
        "not-json"])
@pytest.mark.parametrize("tiny", [False, True], ids=["own-models", "tiny"])
def test_bad_workflows_get_one_error_line(tmp_path, capsys, content, message, tiny):
    path = tmp_path / "workflow.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    rc = main([str(path), "--out", str(tmp_path / "out")] + (["--tiny"] if tiny else []))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(f"error: {path}") and "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_an_unreadable_workflow_file_gets_one_error_line(tmp_path, capsys):
    rc = main([str(tmp_path / "missing.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith(f"error: {tmp_path / 'missing.json'}: not a readable JSON workflow ([Errno 2]"), err


def test_a_missing_prompts_file_gets_one_error_line(tmp_path, capsys):
    rc = main([WORKFLOW, "--prompts", str(tmp_path / "prompts.txt")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == f"error: --prompts {tmp_path / 'prompts.txt'}: no such file"


def test_help_shows_defaults_and_options_are_never_abbreviated(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 3600)", "(default: edit_batch)", "(default: http://127.0.0.1:8188)",
                    "(default: the workflow's)"):
        assert default in text
    with pytest.raises(SystemExit) as exit_:
        main([WORKFLOW, "--time", "5"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --time 5" in capsys.readouterr().err


@pytest.mark.parametrize("args,seeds,sizes", [
    (["--seeds", "0", "1", "2"], [0, 1, 2], None),
    (["--seeds", "0,1,2"], [0, 1, 2], None),
    (["--seeds", "0,1", "2", "--seeds", "3"], [0, 1, 2, 3], None),
    (["--sizes", "256", "320x512"], None, [(256, 256), (320, 512)]),
    (["--sizes", "256,320x512"], None, [(256, 256), (320, 512)]),
])
def test_list_options_take_spaces_and_commas(args, seeds, sizes):
    assert parse_args([WORKFLOW] + args).seeds == seeds
    assert parse_args([WORKFLOW] + args).sizes == sizes


@pytest.mark.parametrize("args,message", [
    (["--seeds", "0,,1"], "argument --seeds: '0,,1': an empty item in the list"),
    (["--seeds", "-1"], "argument --seeds: seed '-1': expected a whole number >= 0"),
    (["--seeds", "１"], "argument --seeds: seed '１': expected a whole number >= 0"),
    (["--sizes", "250"], "argument --sizes: size '250': width and height must be multiples of 16"),
    (["--timeout", "0"], "--timeout 0: expected a number of seconds > 0"),
])
def test_bad_option_values_are_refused(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        parse_args([WORKFLOW] + args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
