"""A real ComfyUI server in a subprocess, driven over its HTTP API (stdlib only).

Used by the quickstart, the end-to-end tests and the figure runner's workers. The server listens on
127.0.0.1 only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

from comfy_client import ComfyClient, PromptFailed, PromptRejected  # noqa: F401 (the errors are part of this API)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ENV = Path(os.environ.get("EQDIFF_ENV", REPO / ".comfy"))
# An environment for another ComfyUI tree (scripts/tree_env.sh) keeps models and custom_nodes in base/.
DEFAULT_BASE = DEFAULT_ENV / "base" if (DEFAULT_ENV / "base").is_dir() else None


class ServerDied(RuntimeError):
    """The server process ended while a prompt was running."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """A function the child runs before exec so that it is SIGKILLed when its parent dies (Linux's
    PR_SET_PDEATHSIG): a server never outlives a killed owner. The signal follows the thread that starts
    the child, which must live as long as the server. libc is opened here, in the parent: between fork
    and exec the child should take no locks."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGKILL)


class ComfyServer(ComfyClient):
    """Start, query and stop one ComfyUI server.

    ``work_dir`` receives the server's input, output, temp and user folders and its log, so
    runs never touch ComfyUI's own folders. ``extra_model_paths`` names YAML files in ComfyUI's
    extra_model_paths format. ``die_with_parent``: the server is killed when this process dies, even by
    SIGKILL (for owners that can be killed, such as the figure runner's Ray actors).
    """

    def __init__(
        self,
        work_dir: Path,
        comfy_dir: Path = DEFAULT_ENV / "ComfyUI",
        python: Path = DEFAULT_ENV / "venv" / "bin" / "python",
        port: int | None = None,
        cpu: bool = True,
        extra_model_paths: list[Path] = (),
        die_with_parent: bool = False,
        base_dir: Path | None = DEFAULT_BASE,
    ):
        self.work_dir = Path(work_dir)
        self.comfy_dir = Path(comfy_dir)
        self.python = Path(python)
        self.port = port or free_port()
        self.cpu = cpu
        self.extra_model_paths = list(extra_model_paths)
        self.base_dir = Path(base_dir) if base_dir else None  # --base-directory: models, custom_nodes
        self.die_with_parent = die_with_parent and sys.platform.startswith("linux")
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.input_dir = self.work_dir / "input"
        self.output_dir = self.work_dir / "output"
        self.log_path = self.work_dir / "server.log"
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
        if self.base_dir:
            cmd += ["--base-directory", str(self.base_dir)]
        if self.cpu:
            cmd.append("--cpu")
        for path in self.extra_model_paths:
            cmd += ["--extra-model-paths-config", str(path)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_die_with_parent() if self.die_with_parent else None)
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

    def check_alive(self, prompt_id: str) -> None:
        if not self.alive():
            raise ServerDied(f"ComfyUI died while running {prompt_id}; log:\n{self.log()[-4000:]}")

    def output_files(self, entry: dict, node_id: str | None = None) -> list[Path]:
        """Files an executed prompt saved to the output folder (all nodes, or one)."""
        return [self.output_dir / item.get("subfolder", "") / item["filename"]
                for item in self.saved_images(entry, node_id)]
