import shutil
from pathlib import Path

import pytest

from comfy_env import COMFY_DIR, ENV, REPO
from comfy_server import ComfyServer
from frontend import write_frontend_settings

ARTIFACTS = REPO / "artifacts" / "e2e"
ASSETS = REPO / "workflows" / "assets"


@pytest.fixture(scope="session")
def server():
    """One real ComfyUI server (127.0.0.1, CPU) with this pack for the whole e2e session."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    srv = ComfyServer(ARTIFACTS / "server", comfy_dir=COMFY_DIR, python=ENV / "venv" / "bin" / "python")
    write_frontend_settings(srv.work_dir / "user")
    srv.start()
    for asset in ASSETS.glob("*.jpg"):
        shutil.copy(asset, srv.input_dir / asset.name)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
