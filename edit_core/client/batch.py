"""Batch runs of an API-format workflow over ComfyUI's HTTP API, spread over one or more
servers, with EDiT on and off for an A/B speed comparison.

    python -m edit_core.client.batch workflows/api/sd35_medium_edit.json --prompts prompts.txt \\
        --seeds 0 1 --sizes 1024 2048 --ab --server http://127.0.0.1:8188 --out runs/

Every job (prompt x seed x size x EDiT on/off) is submitted with POST /prompt and followed
over the websocket; its images are downloaded from /view into --out under names that start
with the run's id (nothing of an earlier run is overwritten), and one JSON line per job is
appended to --out/results.jsonl as soon as it ends (nothing done is lost). A job rejected
with node errors or failing in execution is recorded with the server's message and the
others go on; a server that sends no news of its job for --timeout seconds, or goes away, is
dropped and the job goes to another. Ctrl-C takes this run's prompt off each server (out of
the queue, or interrupted), keeps what finished and exits with 130. Times are the server's
own (execution_start to execution_success), so network and queueing do not count. Needs
aiohttp (a ComfyUI requirement) and tqdm.
"""
import argparse
import asyncio
import itertools
import json
import signal
import statistics
import sys
import time
import urllib.parse
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import aiohttp
from tqdm import tqdm

from ..util.cli import Concatenate, comma_list, read_prompt_file, size_of
from .tiny_workflow import use_tiny_models
from .workflow import Graph, WorkflowError, load_graph, with_settings


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
        size = size_of(text)
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
        """Queue ``graph`` and wait for it; returns the /history entry. Raises ServerDown
        (also after ``timeout`` seconds without any message about the prompt), or
        WorkflowError with the server's own message for rejected or failed prompts. Cancelled
        (Ctrl-C) or timed out, it first takes the prompt off the server."""
        prompt_id = None
        try:
            async with self.session.post(f"{self.url}/prompt", json={"prompt": graph, "client_id": self.client_id}) as r:
                body = await r.json(content_type=None)
                if r.status != 200:
                    raise WorkflowError("rejected: " + describe_rejection(body))
            prompt_id = body["prompt_id"]
            await self.follow(prompt_id, on_progress)
            async with self.session.get(f"{self.url}/history/{prompt_id}") as r:
                history = await r.json()
            if prompt_id not in history:
                raise WorkflowError(f"finished, but {self.url}/history has no entry for prompt {prompt_id}")
            return history[prompt_id]
        except asyncio.TimeoutError as e:
            if prompt_id:
                await self.withdraw(prompt_id)
            raise ServerDown(f"{self.url}: no news of prompt {prompt_id} for {self.timeout:g} s "
                             "(--timeout: seconds without any message about a job)") from e
        except asyncio.CancelledError:
            if prompt_id:
                await self.withdraw(prompt_id)
            raise
        except (aiohttp.ClientError, OSError) as e:
            raise ServerDown(f"{self.url}: {e}") from e

    async def follow(self, prompt_id: str, on_progress=None):
        """Read the websocket until the prompt is done. Every message about it (executing,
        progress, executed, previews...) resets the ``timeout`` clock: a long job that keeps
        reporting is never dropped, a silent one is."""
        last_news = time.monotonic()
        while True:
            left = last_news + self.timeout - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError
            msg = await self.ws.receive(timeout=left)
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                raise ServerDown(f"{self.url}: websocket closed")
            if msg.type == aiohttp.WSMsgType.BINARY:  # previews: sent to this client only, for its running prompt
                last_news = time.monotonic()
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(msg.data)
            data = event.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            last_news = time.monotonic()
            if event["type"] == "progress" and on_progress:
                on_progress(data["value"], data["max"])
            elif event["type"] == "execution_error":
                raise WorkflowError(f"node {data.get('node_id')} ({data.get('node_type')}): "
                                    f"{data.get('exception_type', '').rsplit('.', 1)[-1]}: {data.get('exception_message', '').strip()}")
            elif event["type"] == "execution_interrupted":
                raise WorkflowError("interrupted")
            elif event["type"] == "executing" and data.get("node") is None:
                return  # sent after the history entry is written

    async def withdraw(self, prompt_id: str):
        """Take a prompt off the server: deleted from the queue if it waits there,
        interrupted if it runs (by id, so another client's prompt is never stopped)."""
        limit = aiohttp.ClientTimeout(total=10)
        try:
            async with self.session.get(f"{self.url}/queue", timeout=limit) as r:
                queue = await r.json()
            if any(item[1] == prompt_id for item in queue.get("queue_pending", [])):
                async with self.session.post(f"{self.url}/queue", json={"delete": [prompt_id]}, timeout=limit):
                    pass
            if any(item[1] == prompt_id for item in queue.get("queue_running", [])):
                async with self.session.post(f"{self.url}/interrupt", json={"prompt_id": prompt_id}, timeout=limit):
                    pass
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
            pass  # the server is unreachable: there is nothing left to stop on it

    async def download(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        async with self.session.get(f"{self.url}/view?{query}") as r:
            r.raise_for_status()
            return await r.read()

    async def close(self):
        if self.ws is not None:
            await self.ws.close()


def write_new_file(folder: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to a file that did not exist: ``name``, or ``name`` with -1, -2... added."""
    stem, suffix = Path(name).stem, Path(name).suffix
    for n in itertools.count():
        path = folder / (name if n == 0 else f"{stem}-{n}{suffix}")
        try:
            with open(path, "xb") as f:
                f.write(data)
            return path
        except FileExistsError:
            continue


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
    """Run the jobs, one at a time per server; returns their results by job index. Cancelled
    (Ctrl-C), it takes the running prompts off the servers and returns what finished, with
    the jobs it stopped marked 'interrupted'."""
    run = BatchRun(graph, jobs, servers, out, timeout, warmup, log)
    try:
        await run.dispatch()
    except asyncio.CancelledError:
        pass  # Ctrl-C: the workers have taken their prompts off the servers; keep what finished
    finally:
        run.bar.close()
    return sorted(run.results, key=lambda r: r.job.index)


class BatchRun:
    """One batch run's shared state: the job queue, the servers still up, the results so far
    (each also appended to out/results.jsonl) and the progress bar."""

    def __init__(self, graph: Graph, jobs: List[Job], servers: List[str], out: Path, timeout: float,
                 warmup: bool, log):
        out.mkdir(parents=True, exist_ok=True)
        self.graph, self.jobs, self.out, self.timeout, self.warmup, self.log = graph, jobs, out, timeout, warmup, log
        self.run_id = time.strftime("%Y%m%d-%H%M%S")  # starts this run's image names: no earlier file is overwritten
        self.queue: asyncio.Queue = asyncio.Queue()
        for job in jobs:
            self.queue.put_nowait(job)
        self.results: List[Result] = []
        self.live = set(servers)
        self.bar = tqdm(total=len(jobs), unit="job", file=sys.stderr)

    async def dispatch(self):
        """A worker per live server; again while jobs that a dropped server gave back remain."""
        while not self.queue.empty() and self.live:
            await asyncio.gather(*(self.serve(u) for u in sorted(self.live)))
        while not self.queue.empty():
            self.record(Result(self.queue.get_nowait(), "server-down", message="no server left to run it"))

    async def serve(self, url: str):
        """One server's worker: warm up, then take jobs until none is left. A server that goes
        down, or fails the warm-up, is dropped."""
        async with aiohttp.ClientSession() as session:
            client = Client(url, session, self.timeout)
            try:
                await client.connect()
                if self.warmup and self.jobs:
                    await self.warm_up(client, url)
                while not self.queue.empty():
                    await self.run_job(client, url, self.queue.get_nowait())
            except ServerDown as e:
                self.live.discard(url)
                self.log(f"server {url} dropped: {e}")
            except WorkflowError as e:  # the warm-up failed: the workflow itself is broken here
                self.live.discard(url)
                self.log(f"server {url}: warm-up failed: {e}")
            finally:
                await client.close()

    async def warm_up(self, client: Client, url: str):
        """An untimed run that loads the models; another seed, so its results are not cached."""
        warm = self.jobs[0]
        self.bar.set_postfix_str(f"warm-up on {url}")
        await client.run(with_settings(self.graph, warm.prompt, (warm.seed or 0) + 7919, warm.size, warm.edit))

    async def run_job(self, client: Client, url: str, job: Job):
        """Run one job and record it; a server that goes down gives the job back to the queue."""
        self.bar.set_postfix_str(f"{job.name} on {url}")
        try:
            history = await client.run(with_settings(self.graph, job.prompt, job.seed, job.size, job.edit),
                                       lambda v, m: self.bar.set_postfix_str(f"{job.name} on {url}: step {v}/{m}"))
        except WorkflowError as e:
            self.record(Result(job, failure_status(e), url, message=str(e)))
            return
        except ServerDown:
            self.queue.put_nowait(job)  # another server takes it
            raise
        except asyncio.CancelledError:
            self.record(Result(job, "interrupted", url, message="stopped by Ctrl-C; the server was asked to drop it"))
            raise
        files = await self.save_images(client, job, history)
        self.record(Result(job, "success", url, execution_seconds(history), files=files))

    async def save_images(self, client: Client, job: Job, history: dict) -> List[str]:
        """The job's output images, downloaded into ``out`` under names that start with the run's id."""
        files = []
        for node_out in history.get("outputs", {}).values():
            for image in node_out.get("images", []):
                if image.get("type") != "output":
                    continue
                name = f"{self.run_id}_{job.name}_{len(files)}{Path(image['filename']).suffix}"
                files.append(str(write_new_file(self.out, name, await client.download(image))))
        return files

    def record(self, result: Result):
        self.results.append(result)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps({"run": self.run_id, **asdict(result)}) + "\n")
        self.bar.update(1)
        if result.status != "success":
            self.log(f"{result.job.name} on {result.server or '-'}: {result.status}: {result.message}")


def failure_status(error: WorkflowError) -> str:
    """A failed job's status from the client's error: interrupted, rejected or error."""
    message = str(error)
    if message == "interrupted":
        return "interrupted"
    return "rejected" if message.startswith("rejected") else "error"


async def run_batch_until_ctrl_c(*args, **kwargs) -> Tuple[List[Result], bool]:
    """``run_batch``, stopped cleanly by Ctrl-C (SIGINT): (results, whether it was stopped)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(run_batch(*args, **kwargs))
    stopped = []

    def stop():
        if not stopped:  # later presses: the clean-up is already under way (10 s at most per server)
            stopped.append(True)
            print("\nCtrl-C: taking this run's prompts off the server(s)...", file=sys.stderr, flush=True)
            task.cancel()

    # signal.signal rather than loop.add_signal_handler: the latter does not exist on Windows.
    previous = signal.signal(signal.SIGINT, lambda *_: loop.call_soon_threadsafe(stop))
    try:
        return await task, bool(stopped)
    finally:
        signal.signal(signal.SIGINT, previous)


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


def seed(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"seed {text!r}: expected a whole number >= 0")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m edit_core.client.batch", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("workflow", help="API-format workflow (e.g. workflows/api/sd35_medium_edit.json)")
    p.add_argument("--prompt", action="append", default=[], help="a positive prompt (repeatable; a comma is part "
                   "of the prompt) (default: the workflow's)")
    p.add_argument("--prompts", help="file with one positive prompt per line (default: none)")
    p.add_argument("--seeds", nargs="+", type=comma_list(seed), action=Concatenate, metavar="SEED",
                   help="sampler seeds: 0 1 2 or 0,1,2 (default: the workflow's)")
    p.add_argument("--sizes", nargs="+", type=comma_list(parse_size), action=Concatenate, metavar="SIZE",
                   help="WIDTH or WIDTHxHEIGHT: 1024 2048x1024 or 1024,2048x1024 (default: the workflow's)")
    p.add_argument("--server", nargs="+", type=comma_list(str), action=Concatenate, metavar="URL",
                   help="server URLs, space- or comma-separated, repeatable (default: http://127.0.0.1:8188)")
    p.add_argument("--ab", action="store_true", help="every job with EDiT on and off (Apply EDiT's 'enabled') "
                   "(default: off)")
    p.add_argument("--tiny", action="store_true", help="run on the built-in tiny models (no real checkpoint needed) "
                   "(default: off)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed model-loading run per server "
                   "(default: off)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds without any message about a job (progress, "
                   "executing...) before its server counts as down; a long job that keeps reporting is never "
                   "dropped (default: %(default)g)")
    p.add_argument("--out", default="edit_batch", help="folder for images and results.jsonl; images of each run "
                   "start with the run's id, so earlier runs are kept (default: %(default)s)")
    args = p.parse_args(argv)
    if not args.timeout > 0:
        p.error(f"--timeout {args.timeout:g}: expected a number of seconds > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        prompts = list(args.prompt) + (read_prompt_file(args.prompts, WorkflowError) if args.prompts else [])
        graph = load_graph(args.workflow)
        if args.tiny:
            graph = use_tiny_models(graph)
        jobs = make_jobs(prompts, args.seeds, args.sizes, args.ab)
        with_settings(graph, prompts[0] if prompts else None, args.seeds[0] if args.seeds else None,
                      args.sizes[0] if args.sizes else None, True if args.ab else None)  # fail early
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    servers = args.server or ["http://127.0.0.1:8188"]
    print(f"{len(jobs)} jobs on {len(servers)} server(s)" + (" - TINY built-in models, not your checkpoint" if args.tiny else ""))
    t0 = time.time()
    results, stopped = asyncio.run(run_batch_until_ctrl_c(graph, jobs, servers, Path(args.out), args.timeout,
                                                          not args.no_warmup))
    print(summary(results))
    ok = sum(r.status == "success" for r in results)
    where = Path(args.out) / "results.jsonl"
    if stopped:
        print(f"stopped by Ctrl-C: {ok} of {len(jobs)} jobs succeeded, {len(jobs) - len(results)} not run; "
              f"results in {where}")
        return 130
    print(f"{ok}/{len(results)} succeeded in {time.time() - t0:.0f} s; results in {where}")
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before the batch started (reading the workflow): nothing to clean up
        print("stopped by Ctrl-C", file=sys.stderr)
        sys.exit(130)
