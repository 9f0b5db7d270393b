"""The pack in a real ComfyUI server, driven over the HTTP API."""

import copy
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageOps

from comfy_env import REPO
from comfy_server import PromptFailed, PromptRejected
from numpy_reference import authors_fft_filtering, numpy_split

FFT_WORKFLOW = json.loads((REPO / "workflows" / "api" / "fft_split.json").read_text())
# ComfyUI 0.3.75 without torchaudio: its two audio node modules fail to import; nothing else may.
KNOWN_IMPORT_FAILURES = {"nodes_audio.py", "nodes_audio_encoder.py"}


def test_no_import_failures(server):
    failed = set(re.findall(r"IMPORT FAILED\)?:?\s*(\S+)", server.log()))
    failed = {f.rsplit("/", 1)[-1] for f in failed}
    assert failed <= KNOWN_IMPORT_FAILURES, server.log()[-3000:]


def test_object_info_lists_the_nodes_with_their_inputs(server):
    info = server.get("/object_info/EqDiffFFTSplit")["EqDiffFFTSplit"]
    assert info["display_name"] == "FFT Split"
    assert info["python_module"].endswith("eqdiff-nodes")
    required = info["input"]["required"]
    assert list(required) == ["image", "low_cutoff", "high_cutoff", "shape", "profile",
                              "butterworth_order", "grayscale", "output"]
    assert required["low_cutoff"][0] == "FLOAT" and required["low_cutoff"][1]["max"] == 1.5
    shapes = ["circle", "square", "box"]
    assert required["shape"][1].get("options") == shapes or required["shape"][0] == shapes
    assert all("tooltip" in spec[1] for spec in required.values())
    assert info["output"] == ["IMAGE", "IMAGE", "IMAGE"]
    assert info["output_name"] == ["low", "high", "high preview"]


def as_saved(image):
    """SaveImage's conversion: clip(255 x) truncated to uint8."""
    return np.clip(255.0 * image, 0, 255).astype(np.uint8)


def assert_close_to_saved(path, reference, what):
    saved = np.asarray(Image.open(path).convert("RGB")).astype(int)
    diff = np.abs(saved - as_saved(reference).astype(int))
    assert saved.shape == reference.shape, what
    assert diff.max() <= 1, f"{what}: max difference {diff.max()} levels"


def test_fft_split_workflow_matches_numpy_reference(server):
    """The shipped FFT workflow on a lossless 512 px copy of its photo: ComfyUI decodes JPEGs with PyAV from 0.21
    on, whose pixels differ from PIL's by up to 30 levels, so the reference reads the very same pixels."""
    photo = ImageOps.exif_transpose(Image.open(server.input_dir / "backpack_dog_00.jpg")).convert("RGB")
    photo = photo.resize((512, 512), Image.Resampling.BICUBIC)  # the authors' training size
    photo.save(server.input_dir / "fft_reference.png")
    x = np.asarray(photo).astype(np.float64) / 255.0
    prompt = copy.deepcopy(FFT_WORKFLOW)
    prompt["1"]["inputs"]["image"] = "fft_reference.png"
    entry = server.run(prompt)

    chw = x.transpose(2, 0, 1)[None]
    to_hwc = lambda band: band[0].transpose(1, 2, 0)  # noqa: E731
    low, high = (to_hwc(b) for b in numpy_split(chw, 50 / 256, 50 / 256, "circle", "ideal", 2, False, "signed"))
    high_preview = np.clip(0.5 + 0.5 * high / (3.0 * high.std()), 0, 1)
    assert_close_to_saved(server.output_files(entry, "3")[0], low, "low band")
    assert_close_to_saved(server.output_files(entry, "4")[0], high_preview, "high preview")

    # the authors' filter (numpy, written from their description) on the 512 px photo in [-1, 1]: their 50
    # and 5 bins are the workflow's cutoffs 0.1953125 and 0.01953125 of Nyquist
    authors_low = to_hwc(authors_fft_filtering(chw * 2 - 1, 50, True))
    authors_high = to_hwc(authors_fft_filtering(chw * 2 - 1, 5, False))
    assert_close_to_saved(server.output_files(entry, "6")[0], (authors_low + 1) / 2, "authors' low band")
    preview = np.clip(authors_high / (authors_high.mean() + 3 * authors_high.std()), 0, 1)
    assert_close_to_saved(server.output_files(entry, "7")[0], preview, "authors' high preview")

def split_only(**inputs):
    """The FFT workflow cut down to load -> split -> save, with some split inputs replaced."""
    prompt = {k: copy.deepcopy(FFT_WORKFLOW[k]) for k in ("1", "2", "3")}
    prompt["2"]["inputs"].update(inputs)
    return prompt


@pytest.mark.parametrize("value", [5.0, -0.1, 0.0])
def test_out_of_range_cutoff_is_rejected_and_server_keeps_serving(server, value):
    with pytest.raises(PromptRejected) as err:
        server.queue(split_only(low_cutoff=value))
    assert "prompt_id" not in err.value.body
    errors = err.value.body["node_errors"]["2"]["errors"]
    assert errors[0]["details"] == "low_cutoff"
    assert errors[0]["type"] in ("value_bigger_than_max", "value_smaller_than_min")
    assert server.alive() and server.get("/system_stats")["system"]
    ok = split_only()
    ok["3"]["inputs"]["filename_prefix"] = f"eqdiff/after_rejection_{value}"
    assert server.output_files(server.run(ok), "3")


def test_invalid_branch_is_reported_while_valid_outputs_still_run(server):
    """ComfyUI runs the outputs that validated; the answer names the bad input of the other branch."""
    prompt = copy.deepcopy(FFT_WORKFLOW)
    prompt["2"]["inputs"]["high_cutoff"] = 2.0
    for node_id, prefix in (("3", "partial_low"), ("6", "partial_authors_low")):
        prompt[node_id]["inputs"]["filename_prefix"] = f"eqdiff/{prefix}"
    with pytest.raises(PromptRejected) as err:
        server.queue(prompt)
    assert err.value.body["node_errors"]["2"]["errors"][0]["details"] == "high_cutoff"
    entry = server.wait(err.value.body["prompt_id"])
    assert server.output_files(entry, "6") and not server.output_files(entry, "3")


def test_unknown_option_is_refused_naming_the_input(server):
    """ComfyUI checks V3 combo values itself from 0.8 on (at queue time); before, the node refuses the
    value when it runs. Either way the message names the input."""
    bad = copy.deepcopy(FFT_WORKFLOW)
    bad["2"]["inputs"]["shape"] = "triangle"
    version = tuple(int(p) for p in server.get("/system_stats")["system"]["comfyui_version"].split(".")[:2])
    if version >= (0, 8):
        with pytest.raises(PromptRejected) as err:
            server.queue(bad)
        error = err.value.body["node_errors"]["2"]["errors"][0]
        assert error["extra_info"]["input_name"] == "shape" and "triangle" in error["details"]
    else:
        with pytest.raises(PromptFailed) as err:
            server.run(bad)
        assert "shape: 'triangle' is not one of circle, square" in str(err.value)
    assert server.alive()
