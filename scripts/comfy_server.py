"""A real ComfyUI server in a subprocess, driven over its HTTP API (stdlib only).

Used by the quickstart and the end-to-end tests. The server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ENV = Path(os.environ.get("EQDIFF_ENV", REPO / ".comfy"))


class PromptRejected(RuntimeError):
    """POST /prompt answered 400: the prompt failed validation."""

    def __init__(self, body: dict):
        self.body = body
        super().__init__(json.dumps(body, indent=1))


class PromptFailed(RuntimeError):
    """The prompt ran and ended in an error; ``messages`` holds the server's status messages."""

    def __init__(self, prompt_id: str, messages: list):
        self.prompt_id = prompt_id
        self.messages = messages
        super().__init__(f"prompt {prompt_id} failed: {json.dumps(messages)[:4000]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Start, query and stop one ComfyUI server.

    ``work_dir`` receives the server's input, output, temp and user folders and its log, so
    runs never touch ComfyUI's own folders. ``extra_model_paths`` names YAML files in ComfyUI's
    extra_model_paths format.
    """

    def __init__(
        self,
        work_dir: Path,
        comfy_dir: Path = DEFAULT_ENV / "ComfyUI",
        python: Path = DEFAULT_ENV / "venv" / "bin" / "python",
        port: int | None = None,
        cpu: bool = True,
        extra_model_paths: list[Path] = (),
    ):
        self.work_dir = Path(work_dir)
        self.comfy_dir = Path(comfy_dir)
        self.python = Path(python)
        self.port = port or free_port()
        self.cpu = cpu
        self.extra_model_paths = list(extra_model_paths)
        self.url = f"http://127.0.0.1:{self.port}"
        self.input_dir = self.work_dir / "input"
        self.output_dir = self.work_dir / "output"
        self.log_path = self.work_dir / "server.log"
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        for d in ("input", "output", "temp", "user"):
            (self.work_dir / d).mkdir(parents=True, exist_ok=True)
        cmd = [
            str(self.python), "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--input-directory", str(self.input_dir),
            "--output-directory", str(self.output_dir), "--temp-directory", str(self.work_dir / "temp"),
            "--user-directory", str(self.work_dir / "user"),
            "--database-url", "sqlite:///:memory:",
        ]
        if self.cpu:
            cmd.append("--cpu")
        for path in self.extra_model_paths:
            cmd += ["--extra-model-paths-config", str(path)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start; log:\n{self.log()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s; log:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return json.loads(raw) if resp.headers.get_content_type() == "application/json" else raw

    def get(self, path: str, timeout: float = 30):
        return self._request("GET", path, timeout=timeout)

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id.

        Raises PromptRejected when any node fails validation. ComfyUI still queues the outputs
        that validated (its answer then carries both ``prompt_id`` and ``node_errors``), so a
        caller that wants those can wait on ``err.body["prompt_id"]``.
        """
        try:
            answer = self._request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as err:
            raise PromptRejected(json.loads(err.read() or b"{}")) from None
        if answer.get("node_errors"):
            raise PromptRejected(answer)
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600, on_progress=None) -> dict:
        """Poll /history until the prompt ends; returns its history entry or raises PromptFailed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}; log:\n{self.log()[-4000:]}")
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error":
                    raise PromptFailed(prompt_id, status.get("messages", []))
                if status.get("completed"):
                    return entry
            if on_progress:
                on_progress(self.get("/queue"))
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def output_files(self, entry: dict, node_id: str | None = None) -> list[Path]:
        """Files an executed prompt saved to the output folder (all nodes, or one)."""
        files = []
        for nid, out in entry.get("outputs", {}).items():
            if node_id is not None and nid != node_id:
                continue
            for item in out.get("images", []):
                if item.get("type") == "output":
                    files.append(self.output_dir / item.get("subfolder", "") / item["filename"])
        return files

    def view(self, item: dict) -> bytes:
        query = urllib.parse.urlencode({k: item[k] for k in ("filename", "subfolder", "type") if k in item})
        return self.get(f"/view?{query}")

