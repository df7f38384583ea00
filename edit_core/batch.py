"""Batch runs of an API-format workflow over ComfyUI's HTTP API, spread over one or more
servers, with EDiT on and off for an A/B speed comparison.

    python -m edit_core.batch workflows/api/sd35_medium_edit.json --prompts prompts.txt \\
        --seeds 0 1 --sizes 1024 2048 --ab --server http://127.0.0.1:8188 --out runs/

Every job (prompt x seed x size x EDiT on/off) is submitted with POST /prompt and followed
over the websocket; its images are downloaded from /view into --out, and one JSON line per
job is appended to --out/results.jsonl as soon as it ends (nothing done is lost). A job
rejected with node errors or failing in execution is recorded with the server's message and
the others go on; a server that stops answering is dropped and its job goes to another.
Times are the server's own (execution_start to execution_success), so network and queueing
do not count. Needs aiohttp (a ComfyUI requirement) and tqdm.
"""
import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
import urllib.parse
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import aiohttp
from tqdm import tqdm

from .workflow import Graph, WorkflowError, load_graph, use_tiny_models, with_settings


@dataclass
class Job:
    index: int
    prompt: Optional[str]
    seed: Optional[int]
    size: Optional[tuple]
    edit: Optional[bool]

    @property
    def name(self) -> str:
        parts = [f"{self.index:04d}"]
        if self.size:
            parts.append(f"{self.size[0]}x{self.size[1]}")
        if self.seed is not None:
            parts.append(f"s{self.seed}")
        if self.edit is not None:
            parts.append("edit" if self.edit else "orig")
        return "_".join(parts)


@dataclass
class Result:
    job: Job
    status: str  # success | rejected | error | interrupted | server-down
    server: str = ""
    seconds: Optional[float] = None
    message: str = ""
    files: List[str] = field(default_factory=list)


class ServerDown(Exception):
    pass


def make_jobs(prompts, seeds, sizes, ab: bool) -> List[Job]:
    """A/B pairs adjacent (same prompt, seed, size), so load drifts hit both alike."""
    edits = (True, False) if ab else (None,)
    combos = itertools.product(prompts or [None], seeds or [None], sizes or [None], edits)
    return [Job(i, p, s, z, e) for i, (p, s, z, e) in enumerate(combos)]


def parse_size(text: str) -> tuple:
    try:
        w, _, h = text.lower().partition("x")
        size = (int(w), int(h or w))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected WIDTH or WIDTHxHEIGHT in pixels") from None
    if min(size) < 16 or size[0] % 16 or size[1] % 16:
        raise argparse.ArgumentTypeError(f"size {text!r}: width and height must be multiples of 16")
    return size


class Client:
    """One ComfyUI server: submit, follow over the websocket, fetch outputs."""

    def __init__(self, url: str, session: aiohttp.ClientSession, timeout: float):
        self.url, self.session, self.timeout = url.rstrip("/"), session, timeout
        self.client_id = uuid.uuid4().hex
        self.ws = None

    async def connect(self):
        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        try:
            self.ws = await self.session.ws_connect(ws_url, heartbeat=30)
        except (aiohttp.ClientError, OSError) as e:
            raise ServerDown(f"{self.url}: cannot connect ({e})") from e

    async def run(self, graph: Graph, on_progress=None) -> dict:
        """Queue ``graph`` and wait for it; returns the /history entry. Raises ServerDown,
        or WorkflowError with the server's own message for rejected or failed prompts."""
        try:
            async with self.session.post(f"{self.url}/prompt", json={"prompt": graph, "client_id": self.client_id}) as r:
                body = await r.json(content_type=None)
                if r.status != 200:
                    raise WorkflowError("rejected: " + describe_rejection(body))
            prompt_id = body["prompt_id"]
            deadline = time.monotonic() + self.timeout
            while True:
                msg = await self.ws.receive(timeout=max(1.0, deadline - time.monotonic()))
                if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                    raise ServerDown(f"{self.url}: websocket closed")
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue  # binary preview images
                event = json.loads(msg.data)
                data = event.get("data", {})
                if data.get("prompt_id") != prompt_id:
                    continue
                if event["type"] == "progress" and on_progress:
                    on_progress(data["value"], data["max"])
                elif event["type"] == "execution_error":
                    raise WorkflowError(f"node {data.get('node_id')} ({data.get('node_type')}): "
                                        f"{data.get('exception_type', '').rsplit('.', 1)[-1]}: {data.get('exception_message', '').strip()}")
                elif event["type"] == "execution_interrupted":
                    raise WorkflowError("interrupted")
                elif event["type"] == "executing" and data.get("node") is None:
                    break  # sent after the history entry is written
            async with self.session.get(f"{self.url}/history/{prompt_id}") as r:
                history = await r.json()
            if prompt_id not in history:
                raise WorkflowError(f"finished, but {self.url}/history has no entry for prompt {prompt_id}")
            return history[prompt_id]
        except asyncio.TimeoutError as e:
            raise ServerDown(f"{self.url}: no answer within {self.timeout:.0f} s") from e
        except (aiohttp.ClientError, OSError) as e:
            raise ServerDown(f"{self.url}: {e}") from e

    async def download(self, image: dict, path: Path):
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        async with self.session.get(f"{self.url}/view?{query}") as r:
            r.raise_for_status()
            path.write_bytes(await r.read())

    async def close(self):
        if self.ws is not None:
            await self.ws.close()


def describe_rejection(body) -> str:
    if not isinstance(body, dict):
        return str(body)
    parts = [body.get("error", {}).get("message", "") if isinstance(body.get("error"), dict) else str(body.get("error"))]
    for node_id, err in (body.get("node_errors") or {}).items():
        for e in err.get("errors", []):
            parts.append(f"node {node_id} ({err.get('class_type')}): {e.get('message')} - {e.get('details')}")
    return "; ".join(p for p in parts if p)


def execution_seconds(history: dict) -> Optional[float]:
    stamps = {name: data.get("timestamp") for name, data in history.get("status", {}).get("messages", [])}
    if stamps.get("execution_start") and stamps.get("execution_success"):
        return (stamps["execution_success"] - stamps["execution_start"]) / 1000
    return None


async def run_batch(graph: Graph, jobs: List[Job], servers: List[str], out: Path, timeout: float = 3600,
                    warmup: bool = True, log=print) -> List[Result]:
    out.mkdir(parents=True, exist_ok=True)
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    results: List[Result] = []
    live = set(servers)
    bar = tqdm(total=len(jobs), unit="job", file=sys.stderr)

    def record(result: Result):
        results.append(result)
        line = asdict(result)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        bar.update(1)
        if result.status != "success":
            log(f"{result.job.name} on {result.server or '-'}: {result.status}: {result.message}")

    def job_graph(job: Job) -> Graph:
        return with_settings(graph, job.prompt, job.seed, job.size, job.edit)

    async def worker(url: str):
        async with aiohttp.ClientSession() as session:
            client = Client(url, session, timeout)
            try:
                await client.connect()
                if warmup and jobs:  # loads the models; another seed so its results are not cached
                    warm = jobs[0]
                    bar.set_postfix_str(f"warm-up on {url}")
                    await client.run(with_settings(graph, warm.prompt, (warm.seed or 0) + 7919, warm.size, warm.edit))
                while not queue.empty():
                    job = queue.get_nowait()
                    bar.set_postfix_str(f"{job.name} on {url}")
                    try:
                        history = await client.run(job_graph(job), lambda v, m: bar.set_postfix_str(
                            f"{job.name} on {url}: step {v}/{m}"))
                    except WorkflowError as e:
                        status = "interrupted" if str(e) == "interrupted" else (
                            "rejected" if str(e).startswith("rejected") else "error")
                        record(Result(job, status, url, message=str(e)))
                        continue
                    except ServerDown:
                        queue.put_nowait(job)  # another server takes it
                        raise
                    files = []
                    for node_out in history.get("outputs", {}).values():
                        for k, image in enumerate(node_out.get("images", [])):
                            if image.get("type") != "output":
                                continue
                            path = out / f"{job.name}_{len(files)}{Path(image['filename']).suffix}"
                            await client.download(image, path)
                            files.append(str(path))
                    record(Result(job, "success", url, execution_seconds(history), files=files))
            except ServerDown as e:
                live.discard(url)
                log(f"server {url} dropped: {e}")
            except WorkflowError as e:  # the warm-up failed: the workflow itself is broken here
                live.discard(url)
                log(f"server {url}: warm-up failed: {e}")
            finally:
                await client.close()

    while not queue.empty() and live:  # again while jobs that a dropped server gave back remain
        await asyncio.gather(*(worker(u) for u in sorted(live)))
    while not queue.empty():
        record(Result(queue.get_nowait(), "server-down", message="no server left to run it"))
    bar.close()
    return sorted(results, key=lambda r: r.job.index)


def summary(results: List[Result]) -> str:
    """Per-run times and, for A/B runs, the original/EDiT speed ratio per size."""
    lines = ["| job | status | seconds | server |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.job.name} | {r.status} | {'' if r.seconds is None else f'{r.seconds:.2f}'} | {r.server} |")
    sizes = sorted({r.job.size for r in results if r.job.edit is not None}, key=lambda s: (s is None, s))
    if sizes:
        lines += ["", "| size | original (median s) | EDiT (median s) | speed-up |", "|---|---|---|---|"]
        for size in sizes:
            t = {e: [r.seconds for r in results if r.job.size == size and r.job.edit is e and r.seconds]
                 for e in (False, True)}
            if t[False] and t[True]:
                off, on = statistics.median(t[False]), statistics.median(t[True])
                label = "workflow's" if size is None else f"{size[0]}x{size[1]}"
                lines.append(f"| {label} | {off:.2f} | {on:.2f} | {off / on:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m edit_core.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("workflow", help="API-format workflow (e.g. workflows/api/sd35_medium_edit.json)")
    p.add_argument("--prompt", action="append", default=[], help="a positive prompt (repeatable)")
    p.add_argument("--prompts", help="file with one positive prompt per line")
    p.add_argument("--seeds", nargs="+", type=int, default=[], help="sampler seeds (default: the workflow's)")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[], help="WIDTH or WIDTHxHEIGHT (default: the workflow's)")
    p.add_argument("--server", action="append", default=[], help="server URL (repeatable; default http://127.0.0.1:8188)")
    p.add_argument("--ab", action="store_true", help="every job with EDiT on and off (Apply EDiT's 'enabled')")
    p.add_argument("--tiny", action="store_true", help="run on the built-in tiny models (no real checkpoint needed)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed model-loading run per server")
    p.add_argument("--timeout", type=float, default=3600, help="seconds without news before a server counts as down")
    p.add_argument("--out", default="edit_batch", help="folder for images and results.jsonl")
    args = p.parse_args(argv)

    prompts = list(args.prompt)
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    try:
        graph = load_graph(args.workflow)
        if args.tiny:
            graph = use_tiny_models(graph)
        jobs = make_jobs(prompts, args.seeds, args.sizes, args.ab)
        with_settings(graph, prompts[0] if prompts else None, args.seeds[0] if args.seeds else None,
                      args.sizes[0] if args.sizes else None, True if args.ab else None)  # fail early
    except WorkflowError as e:
        p.error(str(e))
    servers = args.server or ["http://127.0.0.1:8188"]
    print(f"{len(jobs)} jobs on {len(servers)} server(s)" + (" - TINY built-in models, not your checkpoint" if args.tiny else ""))
    t0 = time.time()
    results = asyncio.run(run_batch(graph, jobs, servers, Path(args.out), args.timeout, not args.no_warmup))
    print(summary(results))
    ok = sum(r.status == "success" for r in results)
    print(f"{ok}/{len(results)} succeeded in {time.time() - t0:.0f} s; results in {Path(args.out) / 'results.jsonl'}")
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
