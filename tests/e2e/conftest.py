import shutil
from pathlib import Path

import pytest

from comfy_env import BASE_DIR, COMFY_DIR, ENV, REPO, TINY_CHECKPOINT
from comfy_server import ComfyServer
from frontend import write_frontend_settings
from quickstart import copy_sample_assets

ARTIFACTS = REPO / "artifacts" / "e2e"


TEST_CONCEPT = "backpack_dog.safetensors"
CORRUPT_CONCEPT = "corrupt.safetensors"


def write_test_concepts(folder: Path) -> None:
    """A random-weight concept for the tiny checkpoint, written by the pack's writer, and a broken file."""
    from safetensors import safe_open

    from concept_factory import model_shapes, random_concept
    from eqdiff_core.concept import save

    with safe_open(str(TINY_CHECKPOINT), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.diffusion_model.")}
    concept = random_concept(*model_shapes(shapes), gate=0.5, name="backpack_dog")
    save(concept, str(folder / TEST_CONCEPT))
    data = (folder / TEST_CONCEPT).read_bytes()
    (folder / CORRUPT_CONCEPT).write_bytes(data[: len(data) // 3])


def write_metric_models(folder: Path) -> None:
    """Tiny random CLIP and DINO folders under the default names of Customization Metrics, so that
    workflows keeping the defaults (clip-vit-base-patch32, dino-vits16) run in the server."""
    from metric_models import write_tiny_clip, write_tiny_dino

    write_tiny_clip(folder / "clip-vit-base-patch32")
    write_tiny_dino(folder / "dino-vits16")


@pytest.fixture(scope="session")
def server():
    """One real ComfyUI server (127.0.0.1, CPU) with this pack for the whole e2e session; concept files
    come from a folder of its own, added through extra_model_paths as a user would."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    concepts = ARTIFACTS / "concepts"
    concepts.mkdir(parents=True)
    write_test_concepts(concepts)
    metric_models = ARTIFACTS / "eqdiff_metrics"
    write_metric_models(metric_models)
    yaml_path = ARTIFACTS / "extra_model_paths.yaml"
    yaml_path.write_text(f"eqdiff_tests:\n    eqdiff: {concepts}\n    eqdiff_metrics: {metric_models}\n")
    srv = ComfyServer(ARTIFACTS / "server", comfy_dir=COMFY_DIR, python=ENV / "venv" / "bin" / "python",
                      extra_model_paths=[yaml_path], base_dir=BASE_DIR)
    write_frontend_settings(srv.work_dir / "user")
    srv.start()
    copy_sample_assets(srv.input_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
