"""The HTTP API of one ComfyUI server, standard library only: queue a prompt, wait for it, upload input
files, download what it saved.

Shared by scripts/comfy_server.py (a server this process starts: quickstart, tests) and the figure
runner's workers (scripts/figure_runner/worker.py).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid


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

    def error(self) -> str:
        """The node that failed, its exception and the end of its traceback (the status messages are long)."""
        for event, data in self.messages:
            if event == "execution_error":
                tail = "".join(data.get("traceback", [])[-2:]).rstrip()
                return (f"node {data.get('node_id')} ({data.get('node_type')}) raised {data.get('exception_type')}: "
                        f"{str(data.get('exception_message', '')).strip()}\n{tail}")
        return str(self)


class ComfyClient:
    """Requests to the server at ``url`` (``http://host:port``)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex

    def request(self, method: str, path: str, data: bytes | None = None, content_type: str = "application/json",
                timeout: float = 30):
        """The answer as JSON when the server says it is JSON, else as bytes."""
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return json.loads(raw) if resp.headers.get_content_type() == "application/json" else raw

    def get(self, path: str, timeout: float = 30):
        return self.request("GET", path, timeout=timeout)

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id.

        Raises PromptRejected when any node fails validation. ComfyUI still queues the outputs
        that validated (its answer then carries both ``prompt_id`` and ``node_errors``), so a
        caller that wants those can wait on ``err.body["prompt_id"]``.
        """
        body = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        try:
            answer = self.request("POST", "/prompt", body)
        except urllib.error.HTTPError as err:
            raise PromptRejected(json.loads(err.read() or b"{}")) from None
        if answer.get("node_errors"):
            raise PromptRejected(answer)
        return answer["prompt_id"]

    def check_alive(self, prompt_id: str) -> None:
        """Called on every poll of ``wait``; a server this process owns raises when it has died."""

    def wait(self, prompt_id: str, timeout: float = 600, on_progress=None, poll_timeout: float = 30) -> dict:
        """Poll /history until the prompt ends; returns its history entry or raises PromptFailed. A poll
        the server answers later than ``poll_timeout`` is tried again: a server busy computing (a loaded
        CPU, a model load holding the GIL) answers late, and only ``timeout`` decides that a prompt failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive(prompt_id)
            try:
                history = self.get(f"/history/{prompt_id}", timeout=poll_timeout)
                if on_progress and prompt_id not in history:
                    on_progress(self.get("/queue", timeout=poll_timeout))
            except (TimeoutError, urllib.error.URLError) as err:
                if not isinstance(getattr(err, "reason", err), TimeoutError):
                    raise
                continue
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error":
                    raise PromptFailed(prompt_id, status.get("messages", []))
                if status.get("completed"):
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def upload(self, data: bytes, name: str, subfolder: str, kind: str = "input") -> str:
        """POST /upload/image (any file, replacing one of the same name) into ``kind``/``subfolder``/;
        returns the name LoadImage takes (``subfolder/name``)."""
        boundary = uuid.uuid4().hex
        fields = {"subfolder": subfolder, "type": kind, "overwrite": "true"}
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in fields.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        body = self.request("POST", "/upload/image", b"".join(parts), f"multipart/form-data; boundary={boundary}",
                            timeout=300)
        return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]

    def view(self, item: dict) -> bytes:
        """GET /view: one file of the input, output or temp folder (``filename``, ``subfolder``, ``type``)."""
        query = urllib.parse.urlencode({k: item[k] for k in ("filename", "subfolder", "type") if k in item})
        return self.get(f"/view?{query}", timeout=300)

    @staticmethod
    def saved_images(entry: dict, node_id: str | None = None) -> list[dict]:
        """The images an executed prompt saved to the output folder (type "output"), in the order saved:
        of every node, or of one."""
        return [item for nid, out in entry.get("outputs", {}).items() if node_id is None or nid == node_id
                for item in out.get("images", []) if item.get("type") == "output"]
