"""scripts/quickstart.py's rewrites of the quickstart workflow keep a valid graph."""

import json

from comfy_env import REPO
from quickstart import QUICKSTART_WORKFLOW, tiny_sized, use_shipped_masks


def links(prompt: dict) -> list:
    return [v for node in prompt.values() for v in node["inputs"].values() if isinstance(v, list)]


def test_without_grounding_weights_the_trainer_takes_the_shipped_masks():
    prompt = use_shipped_masks(json.loads(QUICKSTART_WORKFLOW.read_text()))
    types = {n["class_type"] for n in prompt.values()}
    assert not types & {"EqDiffGroundingLoader", "EqDiffGroundedMask"}
    assert {"EqDiffFDTETrainer", "EqDiffEquilibratedSampler", "SaveImage"} <= types
    subject = next(k for k, n in prompt.items() if n["class_type"] == "EqDiffLoadSubject")
    trainer = next(n for n in prompt.values() if n["class_type"] == "EqDiffFDTETrainer")
    assert trainer["inputs"]["masks"] == [subject, 1]
    assert all(target in prompt for target, _ in links(prompt)), "a link points at a removed node"
    assert (REPO / "workflows" / "assets" / "backpack_dog" / "masks" / "00.png").is_file()


def test_tiny_sizing_points_at_the_built_in_models():
    prompt = tiny_sized(json.loads(QUICKSTART_WORKFLOW.read_text()), gpu=False)
    loader = next(n for n in prompt.values() if n["class_type"] == "EqDiffGroundingLoader")
    assert loader["inputs"]["grounding_dino"] == "eqdiff_tiny_swint.safetensors"
    trainer = next(n for n in prompt.values() if n["class_type"] == "EqDiffFDTETrainer")
    assert trainer["inputs"]["precision"] == "fp32" and trainer["inputs"]["steps"] < 600
