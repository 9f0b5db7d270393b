"""EqDiffMetrics in-process, as ComfyUI calls it, with tiny random CLIP / DINO folders registered in
ComfyUI's folder_paths the way extra_model_paths.yaml would."""

import json
import sys

import pytest
import torch

from comfy_runs import progress_reports
from eqdiff_core import metrics as M
from metric_models import write_tiny_clip, write_tiny_dino

SETTINGS = dict(concept_tokens="<backpack_dog>", clip_model="tiny-clip", dino_model="tiny-dino",
                preprocessing="custom_diffusion", clip_t_weight=2.5, device="cpu", filename_prefix="")


@pytest.fixture(scope="module")
def metric_folders(registered_nodes, tmp_path_factory):
    import folder_paths

    root = tmp_path_factory.mktemp("eqdiff_metrics")
    write_tiny_clip(root / "tiny-clip")
    write_tiny_dino(root / "tiny-dino")
    folder_paths.add_model_folder_path("eqdiff_metrics", str(root))
    return root


@pytest.fixture
def node(registered_nodes, metric_folders):
    return registered_nodes["EqDiffMetrics"]


@pytest.fixture
def output_dir(tmp_path):
    import folder_paths

    previous = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_output_directory(previous)


def run(node, generated, references, prompts, **overrides):
    with torch.inference_mode():
        return node.execute(generated=generated, references=references, prompts=prompts,
                            **{**SETTINGS, **overrides})


def test_schema_lists_the_registered_folders_and_documents_every_input(node):
    schema = node.define_schema()
    assert schema.display_name == "Customization Metrics" and schema.description
    assert all(inp.tooltip for inp in schema.inputs)
    options = {inp.id: inp.options for inp in schema.inputs if getattr(inp, "options", None)}
    assert {"tiny-clip", "clip-vit-base-patch32"} <= set(options["clip_model"])
    assert {"tiny-dino", "dino-vits16"} <= set(options["dino_model"])
    with pytest.raises(ValueError, match="clip_model: 'nope' is not one of"):
        run(node, torch.rand(1, 32, 32, 3), torch.rand(1, 32, 32, 3), "a dog", clip_model="nope")


def test_node_equals_core_metrics_and_writes_its_files(node, metric_folders, output_dir):
    generated = torch.rand(3, 48, 64, 3)
    references = torch.rand(2, 80, 80, 3)
    prompts = "a <backpack_dog> backpack in the jungle\n\na <backpack_dog> backpack in the snow\n" \
              "watercolor painting of a <backpack_dog> backpack\n"
    with progress_reports() as progress:
        out = run(node, generated, references, prompts, filename_prefix="eqdiff/metrics", clip_t_weight=1.0)
    csv_text, json_text, clip_t, clip_i, dino_i, table = out.result
    # the bar counts encoded items: CLIP the 3 images, their 3 texts and the 2 references, DINO 3 + 2
    assert progress[-1] == (13, 13) and all(total == 13 for _, total in progress)

    clip = M.ClipEncoder.load(str(metric_folders / "tiny-clip"))
    dino = M.DinoEncoder.load(str(metric_folders / "tiny-dino"))
    want = M.evaluate(clip, dino, generated.movedim(-1, 1), references.movedim(-1, 1),
                      [line for line in prompts.splitlines() if line], ["<backpack_dog>"], clip_t_weight=1.0)
    assert clip_t == pytest.approx(want.summary()["clip_t"], abs=1e-5)
    assert clip_i == pytest.approx(want.summary()["clip_i"], abs=1e-5)
    assert dino_i == pytest.approx(want.summary()["dino_i"], abs=1e-5)
    data = json.loads(json_text)
    assert [img["prompt"] for img in data["images"]] == ["a backpack in the jungle", "a backpack in the snow",
                                                         "watercolor painting of a backpack"]
    assert data["clip_model"] == "tiny-clip" and data["concept_tokens"] == ["<backpack_dog>"]
    assert (data["dino_model"], data["preprocessing"], data["clip_t_weight"]) == ("tiny-dino", "custom_diffusion", 1.0)
    assert csv_text.splitlines()[-1].startswith("mean,,")
    assert table.dim() == 4 and table.shape[0] == 1 and table.shape[-1] == 3 and table.dtype == torch.float32
    assert 0 <= float(table.min()) < float(table.max()) <= 1
    assert out.ui.as_dict()["images"][0]["type"] == "temp"

    written = sorted(p.name for p in (output_dir / "eqdiff").iterdir())
    assert written == ["metrics_00001_.csv", "metrics_00001_.json"]  # no temp files left behind
    assert (output_dir / "eqdiff" / "metrics_00001_.csv").read_text() == csv_text
    run(node, generated, references, prompts, filename_prefix="eqdiff/metrics")
    assert (output_dir / "eqdiff" / "metrics_00002_.json").exists()


def test_one_prompt_for_all_and_encoders_are_cached(node):
    cache = sys.modules[node.__module__]._ENCODERS
    generated = torch.rand(2, 32, 32, 3)
    first = json.loads(run(node, generated, generated[:1], "a <backpack_dog> backpack").result[1])
    cached = {key: encoder for key, (encoder, _) in cache.items()}
    second = json.loads(run(node, generated, generated[:1], "a <backpack_dog> backpack",
                            preprocessing="model_folder").result[1])
    assert {key: encoder for key, (encoder, _) in cache.items()} == cached  # no reload for another preprocessing
    assert [img["prompt"] for img in first["images"]] == ["a backpack"] * 2
    assert first["images"][0]["clip_i"] == pytest.approx(1.0, abs=1e-5)
    # the tiny DINO folder says 224 x 224 bilinear (like facebook/dino-vits16), the protocol 256 -> crop 224 bicubic
    assert second["dino_i"] != pytest.approx(first["dino_i"], abs=1e-7)


def test_prompt_count_must_match(node):
    with pytest.raises(ValueError, match="prompts: 2 lines for 3 generated images"):
        run(node, torch.rand(3, 32, 32, 3), torch.rand(1, 32, 32, 3), "a\nb")


def test_missing_default_folder_names_the_folder_and_the_files(node):
    with pytest.raises(ValueError) as err:  # the pack's own MetricModelError, imported under ComfyUI's module name
        run(node, torch.rand(1, 32, 32, 3), torch.rand(1, 32, 32, 3), "a dog", clip_model="clip-vit-base-patch32")
    message = str(err.value)
    assert type(err.value).__name__ == "MetricModelError"
    assert "eqdiff_metrics/clip-vit-base-patch32' does not exist" in message
    assert "config.json, model.safetensors or pytorch_model.bin, tokenizer.json or vocab.json + merges.txt" in message
