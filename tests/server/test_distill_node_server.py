"""The EDiT Distill node on a real ComfyUI server, attacked and misused over HTTP."""
import json
import math
import time
import urllib.request
import uuid

from helpers import DISTILL_TIMEOUT, distill_graph, run_graph


def upload(server, name: str, content: bytes, subfolder: str, kind: str = "output"):
    """ComfyUI's own POST /upload/image (multipart), as any client of the port can call it."""
    boundary = uuid.uuid4().hex
    fields = [("type", kind), ("subfolder", subfolder), ("overwrite", "true")]
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in fields)
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(server.url + "/upload/image", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_a_planted_code_payload_at_the_checkpoint_path_is_refused_not_run(comfy_server, tmp_path):
    graph, _ = distill_graph(train_steps=6)
    runs = comfy_server.base / "output" / "edit_distill"
    before = set(runs.glob("run-*"))
    first = run_graph(comfy_server, graph, tmp_path / "first", timeout=DISTILL_TIMEOUT)
    assert first.status == "success", first.message
    [run] = set(runs.glob("run-*")) - before

    # A serialised Python object whose loading calls os.system (protocol 0 opcodes: GLOBAL
    # os.system, MARK, STRING, TUPLE, REDUCE, STOP): what torch.load runs when it allows any object.
    marker = tmp_path / "payload-ran"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    saved = upload(comfy_server, "checkpoint.safetensors", payload, f"edit_distill/{run.name}")
    assert saved["subfolder"] == f"edit_distill/{run.name}"
    assert (run / "checkpoint.safetensors").read_bytes() == payload

    # Drop ComfyUI's cached node outputs, or the re-queued node would not run at all: the
    # flag wakes the idle prompt worker, which resets its caches before it takes a prompt.
    comfy_server.post("/free", {"free_memory": True})
    time.sleep(3)
    second = run_graph(comfy_server, graph, tmp_path / "second", timeout=DISTILL_TIMEOUT)
    assert not marker.exists(), "the planted payload ran"
    assert second.status == "error", second.message
    path = run / "checkpoint.safetensors"
    assert f"checkpoint is not valid, delete {path} or pick another work folder" in second.message, second.message


def test_non_finite_node_inputs_are_refused_by_name(comfy_server, tmp_path):
    for name in ("cfg", "learning_rate"):
        graph, distill = distill_graph(train_steps=4)
        graph[distill]["inputs"][name] = math.nan
        result = run_graph(comfy_server, graph, tmp_path / name, timeout=DISTILL_TIMEOUT)
        assert result.status in ("error", "rejected"), result.message
        assert "finite" in result.message and name in result.message, result.message
