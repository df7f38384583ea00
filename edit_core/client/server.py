"""Start and stop a real, headless ComfyUI server with this pack installed (tests, the
example run). No ComfyUI import: the server is a separate process.

The server gets its own base directory (custom_nodes/ComfyUI-EDiT is a symlink to this
pack; models/, input/, output/, user/ live there), an empty front-end folder, and a free
port on 127.0.0.1. ``models`` may point at an existing models folder instead.
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from ..comfyui.env import PACK, find_comfyui

PACK_NAME = "ComfyUI-EDiT"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``with ComfyServer(base) as server: server.url ...``; the log is base/server.log."""

    def __init__(self, base_dir, comfyui_dir=None, python: Optional[str] = None, port: Optional[int] = None,
                 models=None, extra_args=(), ready_timeout: float = 180.0):
        self.base = Path(base_dir).resolve()
        self.comfyui = find_comfyui(comfyui_dir)
        self.python = python or os.environ.get("EDIT_PYTHON") or sys.executable
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.models, self.extra_args, self.ready_timeout = models, list(extra_args), ready_timeout
        self.process: Optional[subprocess.Popen] = None
        self.log_path = self.base / "server.log"

    def _prepare(self):
        for sub in ("custom_nodes", "input", "output", "user", "front_end"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(PACK, target_is_directory=True)
        models = self.base / "models"
        if self.models is not None:
            if models.is_symlink() or not models.exists():
                models.unlink(missing_ok=True)
                models.symlink_to(Path(self.models).resolve(), target_is_directory=True)
        else:
            models.mkdir(exist_ok=True)

    def start(self) -> "ComfyServer":
        self._prepare()
        cmd = [self.python, str(self.comfyui / "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--disable-api-nodes",
               "--front-end-root", str(self.base / "front_end"),
               "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}", *self.extra_args]
        if "--cpu" not in cmd and not _has_cuda(self.python):
            cmd.append("--cpu")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, cwd=str(self.comfyui), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} while starting; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer on {self.url} within {self.ready_timeout:.0f} s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload, timeout: float = 30):
        """(status, JSON body); HTTP errors are returned, not raised."""
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")


def _has_cuda(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return probe.stdout.strip() == "True"
