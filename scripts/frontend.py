"""The real ComfyUI frontend in headless Debian Chromium, driven by Playwright.

Used by the browser tests and by ``python scripts/frontend.py api-to-ui API.json UI.json``, which
turns an API-format workflow into the UI format by loading it in the frontend and saving the graph.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import uuid
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling out of this offline machine.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


# A first-time user sees a templates dialog and a banner; tests and conversions need a bare canvas.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Validation.Workflows": True,
                     "LiteGraph.Canvas.MinFontSizeForLOD": 0}  # full detail at any zoom (screenshots)
# EQDIFF_VUE_NODES=1 or 0: the frontend's "Nodes 2.0" (nodes rendered by Vue, frontend 1.27.1 and later)
# on or off; unset keeps the frontend's default (off up to 1.58 at least).
if os.environ.get("EQDIFF_VUE_NODES") in ("0", "1"):
    FRONTEND_SETTINGS["Comfy.VueNodes.Enabled"] = os.environ["EQDIFF_VUE_NODES"] == "1"


def write_frontend_settings(user_dir: Path) -> None:
    settings = Path(user_dir) / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(FRONTEND_SETTINGS))


@contextlib.contextmanager
def open_frontend(url: str, viewport=(1600, 1000), ready_node_type: str = "EqDiffFFTSplit"):
    """Yields a Playwright page with the ComfyUI app loaded and this pack's nodes registered."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.console_errors = []
            page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
            page.goto(url)
            page.wait_for_function(
                "t => window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.[t]",
                arg=ready_node_type, timeout=120_000,
            )
            # Frontends 1.4x open their start-up workflow after the graph exists; a workflow loaded before
            # that lands in a second tab and the start-up one becomes active again (app.graph is then the
            # default graph). Wait until the start-up workflow is open and drawn.
            page.wait_for_function(
                """() => { const a = window.comfyAPI.app.app, w = a.extensionManager?.workflow;
                           return (!w || w.activeWorkflow) && a.graph?._nodes?.length > 0; }""",
                timeout=120_000,
            )
            yield page
        finally:
            browser.close()


def load_ui_workflow(page, workflow: dict) -> dict:
    """Loads a UI-format workflow; returns what the frontend made of it."""
    return page.evaluate(
        """async wf => {
            const app = window.comfyAPI.app.app;
            await app.loadGraphData(wf);
            const types = window.LiteGraph.registered_node_types;
            const nodes = app.graph._nodes;
            const alerts = [...document.querySelectorAll(".p-toast-message, [role=alert]")]
                .map(e => e.innerText).filter(t => t && t.trim());
            return {
                node_types: nodes.map(n => n.type),
                missing: nodes.filter(n => !types[n.type]).map(n => n.type),
                links: Object.keys(app.graph.links ?? {}).length,
                alerts,
            };
        }""",
        workflow,
    )


def set_widgets(page, node_type: str, values: dict) -> int:
    """Sets widget values on every node of a type, as a person would; returns how many nodes."""
    return page.evaluate(
        """([type, values]) => {
            const nodes = window.comfyAPI.app.app.graph._nodes.filter(n => n.type === type);
            for (const n of nodes)
                for (const w of n.widgets ?? [])
                    if (w.name in values) w.value = values[w.name];
            return nodes.length;
        }""",
        [node_type, values],
    )


def queue_current_graph(page) -> dict:
    """Converts the loaded graph to an API prompt the way the Queue button does, and queues it."""
    return page.evaluate(
        """async () => {
            const app = window.comfyAPI.app.app;
            const converted = await app.graphToPrompt();
            await app.queuePrompt(0, 1);
            return converted.output;
        }"""
    )


def without_nulls(value):
    """The frontend's own serialisation holds nulls that its workflow schema then rejects."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def api_to_ui(url: str, api_workflow: dict) -> dict:
    with open_frontend(url) as page:
        graph = page.evaluate(
            """async wf => {
                const app = window.comfyAPI.app.app;
                await app.loadApiJson(wf, "workflow.json");
                return app.graph.serialize();
            }""",
            api_workflow,
        )
    graph["id"] = str(uuid.uuid4())
    return without_nulls(graph)


def main() -> int:
    import argparse
    import tempfile

    from comfy_server import ComfyServer

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["api-to-ui"])
    parser.add_argument("api_json", type=Path)
    parser.add_argument("ui_json", type=Path)
    args = parser.parse_args()
    server = ComfyServer(Path(tempfile.mkdtemp()))
    write_frontend_settings(server.work_dir / "user")
    with server:
        ui = api_to_ui(server.url, json.loads(args.api_json.read_text()))
    args.ui_json.write_text(json.dumps(ui, indent=2) + "\n")
    print(args.ui_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
