"""The batch CLI against a real ComfyUI server: A/B runs, work spread over servers (one of
them down), failures recorded while the other runs go on; bad input, --timeout, reruns into
the same folder and Ctrl-C."""
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from helpers import REPO
from edit_core.client.batch import Client, ServerDown, main, parse_args
from edit_core.client.tiny_workflow import use_tiny_models
from edit_core.client.workflow import SAMPLERS, WorkflowError, load_graph, nodes_of, with_settings
from edit_core.client.server import free_port

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
         "found an empty object; export the workflow with 'Export (API)' in ComfyUI"),
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
    if message.startswith("node "):
        assert err.endswith("; fix the node, or export the workflow again with 'Export (API)' in ComfyUI"), err
    assert not (tmp_path / "out").exists()


def test_an_unreadable_workflow_file_gets_one_error_line(tmp_path, capsys):
    rc = main([str(tmp_path / "missing.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith(f"error: {tmp_path / 'missing.json'}: not a readable JSON workflow ([Errno 2]"), err


def test_a_missing_prompts_file_gets_one_error_line(tmp_path, capsys):
    rc = main([WORKFLOW, "--prompts", str(tmp_path / "prompts.txt")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == (f"error: --prompts {tmp_path / 'prompts.txt'}: no such file; give a "
                                               "text file with one prompt per line")


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


# -- against the real server: no overwrites, --timeout as silence, Ctrl-C ---------------------
def tiny_workflow(path, steps, size=256):
    """The example workflow on the tiny models with ``steps`` sampling steps (--tiny caps
    them at 4), written as an API workflow file."""
    graph = use_tiny_models(load_graph(WORKFLOW), size=size)
    for node in nodes_of(graph, *SAMPLERS):
        graph[node]["inputs"]["steps"] = steps
    path.write_text(json.dumps(graph))
    return path


def queue_ids(server):
    queue = server.get("/queue")
    return [item[1] for item in queue["queue_running"]], [item[1] for item in queue["queue_pending"]]


def wait_for_empty_queue(server, seconds):
    deadline = time.monotonic() + seconds
    while queue_ids(server) != ([], []):
        assert time.monotonic() < deadline, f"the server still has prompts: {queue_ids(server)}"
        time.sleep(0.2)


def test_a_second_run_into_the_same_folder_keeps_the_first_runs_images(comfy_server, tmp_path, capsys):
    args = [WORKFLOW, "--tiny", "--server", comfy_server.url, "--sizes", "256", "--seeds", "5", "--no-warmup",
            "--out", str(tmp_path)]
    assert main(args + ["--prompt", "a red boat"]) == 0
    [first] = results(tmp_path)
    [first_file] = first["files"]
    first_bytes = open(first_file, "rb").read()
    assert main(args + ["--prompt", "a blue house"]) == 0  # same job name (0000_256x256_s5), another image
    lines = results(tmp_path)
    assert lines[0] == first
    [second_file] = lines[1]["files"]
    assert second_file != first_file and lines[1]["run"] and lines[1]["job"]["prompt"] == "a blue house"
    assert open(first_file, "rb").read() == first_bytes
    assert open(second_file, "rb").read() != first_bytes
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(Path(f).name for f in (first_file, second_file))


@pytest.mark.slow
def test_timeout_counts_seconds_without_news_not_the_jobs_length(comfy_server, tmp_path):
    """A job that keeps reporting progress for longer than the timeout is followed to its
    end; a job the server says nothing about (queued behind it) is dropped after the
    timeout and taken off the server's queue."""
    graph = load_graph(tiny_workflow(tmp_path / "long.json", steps=10_000))
    long_timeout, silent_timeout = 15.0, 3.0

    async def scenario():
        async with aiohttp.ClientSession() as session:
            talker, silent = Client(comfy_server.url, session, long_timeout), Client(comfy_server.url, session,
                                                                                     silent_timeout)
            await talker.connect()
            await silent.connect()
            steps = []
            started = time.monotonic()
            long_job = asyncio.ensure_future(talker.run(graph, lambda value, total: steps.append(time.monotonic())))
            while not steps:  # sampling has started: the long job is running
                assert not long_job.done(), long_job.exception()
                await asyncio.sleep(0.2)
            with pytest.raises(ServerDown, match=f"no news of prompt .* for {silent_timeout:g} s") as dropped:
                await silent.run(with_settings(graph, seed=12345))
            silent_seconds = time.monotonic() - started
            while time.monotonic() - started < 2.5 * long_timeout:
                assert not long_job.done(), long_job.exception()
                await asyncio.sleep(0.5)
            [running], pending = queue_ids(comfy_server)
            comfy_server.post("/interrupt", {"prompt_id": running})
            with pytest.raises(WorkflowError, match="^interrupted$"):
                await long_job
            await talker.close()
            await silent.close()
            return steps, started, silent_seconds, pending, dropped

    steps, started, silent_seconds, pending, dropped = asyncio.run(scenario())
    assert steps[-1] - started > 2.5 * long_timeout - 1  # followed for over twice its timeout...
    assert len(steps) > 3  # ...while it reported progress
    assert pending == []  # the dropped job was taken off the queue
    print(f"long job followed {steps[-1] - started:.0f} s ({len(steps)} steps, timeout {long_timeout:g} s); "
          f"silent one dropped after {silent_seconds:.1f} s: {dropped.value}")
    wait_for_empty_queue(comfy_server, 30)


def test_ctrl_c_takes_the_running_prompt_off_the_server_and_exits_130(comfy_server, tmp_path):
    workflow = tiny_workflow(tmp_path / "slow.json", steps=12)
    out = tmp_path / "out"
    cli = subprocess.Popen([sys.executable, "-m", "edit_core.client.batch", str(workflow), "--server", comfy_server.url,
                            "--seeds", "0", "1", "2", "3", "4", "--no-warmup", "--out", str(out)],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        # Ctrl-C once a job has finished and the next one runs on the server.
        while not ((out / "results.jsonl").exists() and queue_ids(comfy_server)[0]):
            assert cli.poll() is None and time.monotonic() < deadline, cli.communicate()
            time.sleep(0.05)
        [running], _ = queue_ids(comfy_server)
        cli.send_signal(signal.SIGINT)
        stdout, stderr = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert "stopped by Ctrl-C" in stdout
    wait_for_empty_queue(comfy_server, 15)  # interrupted at its next step, not run to its end
    rows = results(out)
    *finished, last = rows
    assert finished and all(r["status"] == "success" and Path(r["files"][0]).is_file() for r in finished)
    assert last["status"] == "interrupted" and "Ctrl-C" in last["message"]
    assert len(rows) < 5
    history = comfy_server.get(f"/history/{running}")[running]
    assert any(name == "execution_interrupted" for name, _ in history["status"]["messages"]), history["status"]
