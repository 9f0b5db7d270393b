"""workflows/api/generate.json in the real server: load checkpoint + concept, apply, RRA, sample, save."""

import copy
import json

import numpy as np
import pytest
from PIL import Image

from comfy_env import REPO
from comfy_server import PromptFailed, PromptRejected
CORRUPT_CONCEPT = "corrupt.safetensors"  # written by the e2e conftest

GENERATE = json.loads((REPO / "workflows" / "api" / "generate.json").read_text())


def small(prompt: dict, prefix: str, steps: int = 3) -> dict:
    """The workflow at 64 px and a few steps, for a CPU."""
    p = copy.deepcopy(prompt)
    p["8"]["inputs"].update(width=64, height=64)
    p["9"]["inputs"]["steps"] = steps
    p["11"]["inputs"]["filename_prefix"] = f"eqdiff/{prefix}"
    return p


def test_generate_workflow_runs(server):
    entry = server.run(small(GENERATE, "generate"))
    files = server.output_files(entry, "11")
    assert len(files) == 1
    image = np.asarray(Image.open(files[0]))
    assert image.shape == (64, 64, 3) and image.std() > 0
    again = server.output_files(server.run(small(GENERATE, "generate_again")), "11")
    assert np.array_equal(np.asarray(Image.open(again[0])), image), "same seed, same image"


def test_missing_concept_is_rejected_naming_the_input(server):
    bad = small(GENERATE, "missing")
    bad["2"]["inputs"]["concept_name"] = "no_such_concept.safetensors"
    with pytest.raises(PromptRejected) as err:
        server.queue(bad)
    error = err.value.body["node_errors"]["2"]["errors"][0]
    assert "concept_name: 'no_such_concept.safetensors' is not in" in error["details"]
    assert server.alive()


def test_corrupt_concept_fails_clearly_and_server_keeps_serving(server):
    bad = small(GENERATE, "corrupt")
    bad["2"]["inputs"]["concept_name"] = CORRUPT_CONCEPT
    with pytest.raises(PromptFailed) as err:
        server.run(bad)
    error = next(m[1] for m in err.value.messages if m[0] == "execution_error")
    assert error["node_id"] == "2" and "cannot read concept file" in error["exception_message"]
    assert server.output_files(server.run(small(GENERATE, "after_corrupt")), "11")


def test_object_info_lists_every_node(server):
    info = server.get("/object_info")
    for node_id in ("EqDiffFFTSplit", "EqDiffLoadConcept", "EqDiffApplyConcept", "EqDiffRRAPatch",
                    "EqDiffEquilibratedSampler", "EqDiffSampler"):
        assert node_id in info, node_id
        assert info[node_id]["category"] == "EqDiff" and info[node_id]["description"]
    assert "backpack_dog.safetensors" in info["EqDiffLoadConcept"]["input"]["required"]["concept_name"][1]["options"]
