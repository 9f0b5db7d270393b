"""The Ray actor that owns one ComfyUI server on its node: its own port and folders (under the node's
``work_root``), the GPU Ray gave the actor (CUDA_VISIBLE_DEVICES, inherited by the server) or the CPU.
It runs one job at a time: uploads the files the job needs that this server does not have yet, queues the
filled workflow, waits, and downloads what the job collects, all through the server's HTTP API.

A server that dies is noticed by the job it was running (ServerLost: the driver gives the job to another
worker) and started again before this worker's next job. The server is killed with its actor even when
the actor is SIGKILLed (PR_SET_PDEATHSIG), so a lost actor leaves no server behind; Ray restarts the actor.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import ray
from comfy_client import PromptFailed, PromptRejected
from comfy_server import ComfyServer, ServerDied

CONCEPT_FOLDER = "eqdiff_concepts"  # under each server's input folder; registered as its concept folder


class JobFailed(RuntimeError):
    """The workflow of one job failed (rejected, an error while running, no output): it is recorded as
    failed and retried on the next run, not now; the server keeps serving."""


class ServerLost(RuntimeError):
    """The server died or stopped answering during a job: the job goes to another worker."""


def ended(server: ComfyServer, grace: float = 5.0) -> bool:
    """Whether the server process has ended: a killed server's connections break a moment before its
    process is gone, so it is given ``grace`` seconds."""
    try:
        server.proc.wait(timeout=grace)
        return True
    except subprocess.TimeoutExpired:
        return False


class ComfyWorker:
    """``settings``: comfy_dir, python (paths valid on every node), work_root, gpu, model_folders (ComfyUI
    folder name -> path, e.g. checkpoints), extra_model_paths (YAML files), start_timeout."""

    def __init__(self, name: str, settings: dict):
        self.name = name
        self.settings = settings
        self.server: ComfyServer | None = None
        self.uploaded: dict[str, str] = {}  # subfolder/name -> digest, on the current server
        self.work_dir = Path(settings["work_root"]) / f"{name}-{uuid.uuid4().hex[:8]}"
        # One CPU thread per server on every node (Ray's own default for a one-CPU actor, made explicit): CPU
        # results then do not depend on where a job ran, since float sums change with the thread count.
        os.environ["OMP_NUM_THREADS"] = "1"
        self.start_server()

    def start_server(self) -> None:
        """A new server with this worker's folders; its concept folder first among the concept paths."""
        if self.server is not None:
            self.server.stop()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        concepts = self.work_dir / "input" / CONCEPT_FOLDER
        concepts.mkdir(parents=True, exist_ok=True)
        folders = {"eqdiff": concepts, **self.settings["model_folders"]}
        yaml_path = self.work_dir / "extra_model_paths.yaml"
        # is_default: first in line, so Save Concept writes the trained concept here, where /view reads it
        yaml_path.write_text("eqdiff_runner:\n    is_default: true\n"
                             + "".join(f'    {k}: "{v}"\n' for k, v in folders.items()))
        self.server = ComfyServer(self.work_dir, comfy_dir=Path(self.settings["comfy_dir"]),
                                  python=Path(self.settings["python"]), cpu=not self.settings["gpu"],
                                  extra_model_paths=[yaml_path, *map(Path, self.settings["extra_model_paths"])],
                                  die_with_parent=True)
        self.uploaded = {}
        self.server.start(timeout=self.settings["start_timeout"])

    def describe(self) -> dict:
        """Where this worker runs and what its server is (versions and device from /system_stats)."""
        stats = self.server.get("/system_stats")
        device = stats["devices"][0] if stats.get("devices") else {}
        return {"worker": self.name, "node": socket.gethostname(), "url": self.server.url, "pid": self.server.proc.pid,
                "folder": str(self.work_dir), "comfyui": stats["system"].get("comfyui_version"),
                "python": stats["system"].get("python_version", "").split()[0],
                "torch": stats["system"].get("pytorch_version"), "device": device.get("name"),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def run(self, request: dict) -> dict:
        """One job (see requests.RequestMaker.request); its images and concept as bytes."""
        if not self.server.alive():
            self.start_server()
        started = time.monotonic()
        server = self.server
        try:
            for item in request["uploads"]:
                key = f"{item['subfolder']}/{item['name']}"
                if self.uploaded.get(key) != item["digest"]:
                    server.upload(ray.get(item["data"]), item["name"], item["subfolder"])
                    self.uploaded[key] = item["digest"]
            prompt_id = server.queue(request["prompt"])
            entry = server.wait(prompt_id, timeout=request["timeout"])
            images = {node_id: [server.view(item) for item in server.saved_images(entry, node_id)]
                      for node_id in request["collect"]}
            concept = None
            if request["concept"]:
                concept = server.view({"filename": request["concept"], "subfolder": CONCEPT_FOLDER, "type": "input"})
        except PromptRejected as err:
            raise JobFailed(f"the server rejected the workflow: {str(err)[:2000]}") from None
        except PromptFailed as err:
            raise JobFailed(f"the workflow failed: {err.error()}") from None
        except TimeoutError as err:
            raise JobFailed(str(err)) from None
        except OSError as err:  # connection refused or reset, an HTTP error: is the server still there?
            if not ended(server):
                raise JobFailed(f"the server answered with an error: {err}") from None
            raise ServerLost(f"{self.name}: ComfyUI died during {request['job']}; log:\n{server.log()[-2000:]}") from None
        except ServerDied as err:
            raise ServerLost(f"{self.name}: {str(err)[:2000]}") from None
        return {"images": images, "concept": concept, "prompt_id": prompt_id, "worker": self.name,
                "seconds": round(time.monotonic() - started, 3)}

    def close(self) -> None:
        """Stops the server; its uploads and outputs go, its log stays."""
        self.server.stop()
        for sub in ("input", "output", "temp"):
            shutil.rmtree(self.work_dir / sub, ignore_errors=True)
