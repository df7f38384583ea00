"""The batch CLI against a real ComfyUI server: A/B runs, work spread over servers (one of
them down), failures recorded while the other runs go on."""
import json

from conftest import REPO
from edit_core.batch import main
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
