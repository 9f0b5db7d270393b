"""workflows/api/table1_metrics.json in the real server: Prompt List -> one sampling per prompt -> Rebatch
Images -> Customization Metrics against the subject photos, with the tiny checkpoint and the tiny metric
models the e2e server has under the default folder names."""

import copy
import csv
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from comfy_env import REPO
from comfy_server import PromptRejected

TABLE1 = json.loads((REPO / "workflows" / "api" / "table1_metrics.json").read_text())
METRICS = ("clip_t", "clip_i", "dino_i")


def node_of(workflow, class_type):
    ids = [k for k, v in workflow.items() if v["class_type"] == class_type]
    assert len(ids) == 1, (class_type, ids)
    return ids[0]


def small(prefix):
    p = copy.deepcopy(TABLE1)
    p[node_of(p, "EqDiffPromptList")]["inputs"].update(list="nolive", first_index=0, count=2)
    p[node_of(p, "EmptyLatentImage")]["inputs"].update(width=64, height=64)
    p[node_of(p, "EqDiffEquilibratedSampler")]["inputs"]["steps"] = 2
    p[node_of(p, "EqDiffLoadSubject")]["inputs"]["size"] = 64
    p[node_of(p, "EqDiffMetrics")]["inputs"].update(device="cpu", filename_prefix=f"{prefix}/metrics")
    for node_id in (k for k, v in p.items() if v["class_type"] == "SaveImage"):
        p[node_id]["inputs"]["filename_prefix"] = f"{prefix}/{node_id}"
    return p


def test_table1_generates_one_image_per_prompt_and_writes_the_metrics_table(server):
    prompt = small("e2e_table1")
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success"

    save = next(k for k, v in prompt.items() if v["_meta"]["title"].startswith("param:output"))
    images = [np.asarray(Image.open(f)) for f in server.output_files(entry, save)]
    assert [im.shape for im in images] == [(64, 64, 3)] * 2, "one 64 px image per prompt, saved as one batch"
    assert not np.array_equal(images[0], images[1]), "each prompt has its own sampling"

    folder = server.output_dir / "e2e_table1"
    data = json.loads((folder / "metrics_00001_.json").read_text())
    assert (data["generated"], data["references"]) == (2, 5)  # the five photos of input/backpack_dog/
    # the prompts as sampled, with the concept token (linked from Apply Concept) removed for CLIP-T
    assert [img["prompt"] for img in data["images"]] == ["a backpack in the jungle", "a backpack in the snow"]
    for key in METRICS:
        values = [img[key] for img in data["images"]]
        assert all(math.isfinite(v) for v in values + [data[key]]), key
        assert abs(data[key] - float(np.mean(values))) < 1e-6, key
    assert 0.0 <= data["clip_t"] <= 2.5 and -1.0 <= data["clip_i"] <= 1.0 and -1.0 <= data["dino_i"] <= 1.0

    rows = list(csv.DictReader(io.StringIO((folder / "metrics_00001_.csv").read_text())))
    assert [r["image"] for r in rows] == ["0", "1", "mean"]
    for key in METRICS:
        assert math.isfinite(float(rows[-1][key])) and abs(float(rows[-1][key]) - data[key]) < 1e-5, key

    table_node = node_of(prompt, "EqDiffMetrics")
    table_save = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage" and v["inputs"]["images"][0]
                      == table_node)
    (table,) = server.output_files(entry, table_save)
    assert Image.open(table).size[0] > 64, "the table is saved as an image"


def test_a_bad_prompt_range_is_refused_naming_the_input(server):
    prompt = small("e2e_table1_bad")
    prompt_list = node_of(prompt, "EqDiffPromptList")
    prompt[prompt_list]["inputs"].update(list="style", first_index=21, count=2)
    with pytest.raises(PromptRejected) as err:
        server.queue(prompt)
    errors = err.value.body["node_errors"][prompt_list]["errors"]  # ComfyUI repeats it once per input
    assert errors and all(e["type"] == "custom_validation_failed" for e in errors)
    details = errors[0]["details"]
    assert "first_index 21 + count 2 goes past the end of the list (22 prompts)" in details
    assert "lower count to at most 1" in details
    assert not err.value.body.get("prompt_id"), "nothing is queued: every output needs the prompt list"
    assert server.alive()
