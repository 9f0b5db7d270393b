"""The UI-format workflow in the real ComfyUI frontend (headless Debian Chromium + Playwright)."""

import json
import time

import pytest

from comfy_env import REPO
from frontend import load_ui_workflow, open_frontend, queue_current_graph, set_widgets
from sizing import CPU_SIZED

pytestmark = pytest.mark.browser
UI_WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
# generous: fig8 trains and samples several variants, and a shared 2-core machine can take 10 min
def new_history_entry(server, before: set, timeout=1800) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = set(server.get("/history")) - before
        if fresh:
            return fresh.pop()
        time.sleep(0.2)
    raise TimeoutError("the frontend's prompt did not finish in time (or the server rejected it: see its log)")


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_ui_workflow_loads_queues_and_completes(server, artifacts, path):
    workflow = json.loads(path.read_text())
    with open_frontend(server.url, viewport=(2000, 1250)) as page:
        loaded = load_ui_workflow(page, workflow)
        assert loaded["missing"] == [], f"missing node types: {loaded['missing']}"
        assert loaded["alerts"] == [], loaded["alerts"]
        assert sorted(loaded["node_types"]) == sorted(n["type"] for n in workflow["nodes"])
        assert loaded["links"] == len(workflow["links"]), "links were dropped on load"

        for node_type, values in CPU_SIZED.items():
            set_widgets(page, node_type, values)
        before = set(server.get("/history"))
        prompt = queue_current_graph(page)
        assert {n["class_type"] for n in prompt.values()} == {n["type"] for n in workflow["nodes"]}
        entry = server.wait(new_history_entry(server, before))
        assert entry["status"]["status_str"] == "success"
        assert entry["outputs"], "the workflow output nothing"
        # every image the server sent reached the frontend's store of node previews (what the nodes draw); the
        # history entry can be there before the browser has handled the last "executed" message, so wait a little
        sent = {node_id: [i["filename"] for i in out["images"]] for node_id, out in entry["outputs"].items()
                if out.get("images")}
        deadline = time.monotonic() + 60
        while True:
            shown = page.evaluate("""() => Object.fromEntries(Object.entries(window.comfyAPI.app.app.nodeOutputs ?? {})
                                       .map(([id, out]) => [id, (out?.images ?? []).map(i => i.filename)]))""")
            if all(shown.get(k) == v for k, v in sent.items()) or time.monotonic() > deadline:
                break
            page.wait_for_timeout(250)
        for node_id, filenames in sent.items():
            assert shown.get(node_id) == filenames, f"node {node_id}'s previews"
        page.evaluate("() => window.comfyAPI.app.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        page.wait_for_timeout(1500)  # let the previews render before the screenshot
        page.screenshot(path=str(artifacts / f"browser_{path.stem}.png"))
        ours = [e for e in page.console_errors if "eqdiff" in e.lower()]
        assert ours == [], ours
