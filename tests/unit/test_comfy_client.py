"""scripts/comfy_client.py's polling against an HTTP peer that answers late or with an error (Python's own
http.server on 127.0.0.1: what is tested is the client's handling of the socket, not ComfyUI)."""

import json
import threading
import time
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from comfy_client import ComfyClient

DONE = {"p1": {"status": {"status_str": "success", "completed": True}, "outputs": {}}}


@pytest.fixture
def peer():
    """Answers GET /history/p1: the first ``late`` requests after 1 s, then at once; ``status`` decides the code."""
    seen = {"history": 0, "late": 1, "status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen["history"] += 1
            if seen["history"] <= seen["late"]:
                time.sleep(1.0)
            body = json.dumps(DONE).encode()
            self.send_response(seen["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except BrokenPipeError:  # the client gave up on this late answer
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()


def test_a_late_answer_to_a_poll_is_polled_again(peer):
    url, seen = peer
    assert ComfyClient(url).wait("p1", timeout=30, poll_timeout=0.3) == DONE["p1"]
    assert seen["history"] >= 2, "the first poll timed out and a second one got the answer"


def test_only_the_prompts_own_timeout_ends_the_wait(peer):
    url, seen = peer
    seen["late"] = 10**6
    with pytest.raises(TimeoutError, match="prompt p1 did not finish within 2 s"):
        ComfyClient(url).wait("p1", timeout=2, poll_timeout=0.3)


def test_an_http_error_is_not_taken_for_a_late_answer(peer):
    url, seen = peer
    seen["late"], seen["status"] = 0, 500
    with pytest.raises(urllib.error.HTTPError):
        ComfyClient(url).wait("p1", timeout=30, poll_timeout=0.3)
