"""Every figure workflow (workflows/api/, made by scripts/figure_workflows.py) runs to completion in the
real server on the built-in tiny models, at 64 px with a training step and two sampling steps each."""

import json

import numpy as np
import pytest
from PIL import Image

from comfy_env import REPO
from sizing import CPU_SIZED

FIGURES = ["eqdiff_quickstart", "fig1_customization", "fig5_reference_attention", "fig6_comparison",
           "fig8_ablation", "fig9_fdte_probabilities"]

# The maps of a concept trained for one step are uniform (its RRA gates start at zero, so M^f is 0
# everywhere): a flat map is a right answer there, a flat generated image is not.
FLAT_ALLOWED = {"EqDiffReferenceMaps"}


def cpu_sized(prompt: dict, prefix: str) -> dict:
    for node in prompt.values():
        node["inputs"].update(CPU_SIZED.get(node["class_type"], {}))
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = f"e2e_{prefix}/" + node["inputs"]["filename_prefix"].split("/")[-1]
    return prompt


def test_the_generator_wrote_the_shipped_workflows():
    """workflows/api/ holds exactly what scripts/figure_workflows.py makes (no hand edits drift)."""
    from figure_workflows import WORKFLOWS

    for name in FIGURES:
        assert json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()) == WORKFLOWS[name](), name


@pytest.mark.parametrize("name", FIGURES)
def test_figure_workflow_runs_on_the_tiny_models(server, name):
    prompt = cpu_sized(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()), name)
    entry = server.run(prompt, timeout=900)
    saves = [k for k, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert saves
    for node_id in saves:
        files = server.output_files(entry, node_id)
        assert files, f"{name}: node {node_id} ({prompt[node_id]['_meta']['title']}) saved nothing"
        image = np.asarray(Image.open(files[0]))
        # a picture, not a blank: 8-bit RGB(A) with more than one colour (a NaN decodes to a flat image)
        assert image.ndim == 3 and image.shape[2] in (3, 4) and image.dtype == np.uint8
        if prompt[prompt[node_id]["inputs"]["images"][0]]["class_type"] in FLAT_ALLOWED:
            continue
        assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 1, f"{name}: node {node_id} saved a flat image"
