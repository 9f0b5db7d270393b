"""workflows/api/train.json in the real server: subject photos + masks -> FDTE Trainer -> Save Concept;
then the trained file drives workflows/api/generate.json."""

import copy
import json
import shutil

import numpy as np
from PIL import Image, ImageDraw

from comfy_env import REPO

TRAIN = json.loads((REPO / "workflows" / "api" / "train.json").read_text())
GENERATE = json.loads((REPO / "workflows" / "api" / "generate.json").read_text())
ASSET = REPO / "workflows" / "assets" / "backpack_dog_00.jpg"


def make_subject(input_dir, name="e2e_subject", count=3):
    """Three photos (the shipped one, flipped and rotated) with elliptic masks under masks/."""
    folder = input_dir / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "masks").mkdir(parents=True)
    photo = Image.open(ASSET).convert("RGB")
    for i, im in enumerate([photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), photo.rotate(8)][:count]):
        im.save(folder / f"{i:02d}.jpg")
        mask = Image.new("L", im.size, 0)
        w, h = im.size
        ImageDraw.Draw(mask).ellipse([w * 0.25, h * 0.2, w * 0.75, h * 0.85], fill=255)
        mask.save(folder / "masks" / f"{i:02d}.png")
    return name


def small_train(folder: str, name: str) -> dict:
    p = copy.deepcopy(TRAIN)
    p["2"]["inputs"].update(folder=folder, size=64)
    p["3"]["inputs"]["resolution"] = 64
    p["4"]["inputs"].update(steps=2, batch_size=1, precision="fp32", name=name)
    p["5"]["inputs"]["name"] = name
    p["7"]["inputs"].update(count=2, size=64, steps=2)
    return p


def test_train_workflow_writes_a_concept_the_inference_nodes_use(server, artifacts):
    from eqdiff_core import concept as concept_io

    folder = make_subject(server.input_dir)
    entry = server.run(small_train(folder, "e2e_trained"))
    saved = artifacts / "concepts" / "e2e_trained.safetensors"  # the first configured eqdiff folder
    concept = concept_io.load(str(saved))
    assert concept.metadata["training_step"] == 2 and concept.metadata["class_word"] == "backpack"
    assert concept.metadata["photos"] == 3 and not concept.training_state
    assert concept.reference_context is not None and concept.rra and concept.kv_deltas
    assert entry["outputs"]["6"]["images"], "the loss plot is previewed"

    gen = copy.deepcopy(GENERATE)
    gen["2"]["inputs"]["concept_name"] = "e2e_trained.safetensors"
    gen["3"]["inputs"]["token"] = ""  # the concept's own token, <e2e_trained>
    gen["6"]["inputs"]["text"] = "a photo of <e2e_trained> backpack in the snow"
    gen["8"]["inputs"].update(width=64, height=64)
    gen["9"]["inputs"]["steps"] = 3
    gen["11"]["inputs"]["filename_prefix"] = "eqdiff/trained"
    image = np.asarray(Image.open(server.output_files(server.run(gen), "11")[0]))
    assert image.shape == (64, 64, 3) and image.std() > 0


def test_mismatched_masks_fail_clearly_and_the_server_keeps_serving(server):
    from comfy_server import PromptFailed

    folder = make_subject(server.input_dir, "e2e_bad_subject")
    (server.input_dir / folder / "masks" / "01.png").unlink()
    Image.new("L", (64, 64), 0).save(server.input_dir / folder / "masks" / "01.png")  # an empty mask
    try:
        server.run(small_train(folder, "e2e_bad"))
        raise AssertionError("an empty mask must fail")
    except PromptFailed as err:
        error = next(m[1] for m in err.messages if m[0] == "execution_error")
        assert error["node_id"] == "4" and "mask of photo 2 is empty" in error["exception_message"]
    assert server.alive()


def test_bad_trainer_inputs_are_refused_under_the_input_at_fault(server):
    """steps 0 would train nothing; a bad name is reported under ``name`` only, so the frontend marks
    that widget."""
    from comfy_server import PromptRejected

    folder = make_subject(server.input_dir, "e2e_refused")
    zero_steps = small_train(folder, "e2e_refused")
    zero_steps["4"]["inputs"]["steps"] = 0
    bad_name = small_train(folder, "e2e_refused")
    bad_name["4"]["inputs"]["name"] = "my concept!"
    for prompt, field, message in ((zero_steps, "steps", "min"), (bad_name, "name", "must start with a letter")):
        try:
            server.queue(prompt)
            raise AssertionError(f"{field} must be refused")
        except PromptRejected as err:
            errors = err.body["node_errors"]["4"]["errors"]
            assert {e["extra_info"]["input_name"] for e in errors} == {field}, errors
            assert message in json.dumps(errors)
    assert server.alive()
