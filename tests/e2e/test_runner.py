"""scripts/run_figure.py against the real e2e server: generate.json over one subject x 2 prompts with 2
steps, stopped after one job and resumed, then the metrics from tiny CLIP / DINO folders."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_env import REPO
from eqdiff_core import metrics as M
from metric_models import write_tiny_clip, write_tiny_dino

RUNNER = REPO / "scripts" / "run_figure.py"
WORKFLOW = REPO / "workflows" / "api" / "generate.json"
PHOTO = REPO / "workflows" / "assets" / "backpack_dog_00.jpg"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A DreamBooth-style subjects folder (two photos of different sizes), a 2-line prompt list and
    tiny metric model folders."""
    root = tmp_path_factory.mktemp("runner_inputs")
    subject = root / "subjects" / "backpack_dog"
    subject.mkdir(parents=True)
    shutil.copy(PHOTO, subject / "00.jpg")
    with Image.open(PHOTO) as photo:
        photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((300, 300)).save(subject / "01.jpg")
    (root / "subjects" / "prompts_and_classes.txt").write_text("Classes\n\nsubject_name,class\nbackpack_dog,backpack\n")
    (root / "prompts.txt").write_text("a {} in the jungle\na {} on the beach")
    return {"subjects": root / "subjects", "prompts": root / "prompts.txt",
            "clip": write_tiny_clip(root / "clip"), "dino": write_tiny_dino(root / "dino")}


def run_figure(server, inputs, out, *extra):
    cmd = [sys.executable, str(RUNNER), "--server", server.url, "--workflow", str(WORKFLOW),
           "--checkpoint", "eqdiff_tiny_sd15.safetensors", "--subjects", str(inputs["subjects"]),
           "--subset", "backpack_dog", "--prompts", str(inputs["prompts"]), "--steps", "2", "--size", "64",
           "--out", str(out), "--clip-model", str(inputs["clip"]), "--dino-model", str(inputs["dino"]),
           "--metrics-device", "cpu", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_run_stop_and_resume_then_metrics(server, inputs, artifacts):
    out = artifacts / "runner"
    shutil.rmtree(out, ignore_errors=True)
    first = run_figure(server, inputs, out, "--max-jobs", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "stopped at --max-jobs" in first.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [j["status"] for j in manifest["jobs"].values()] == ["done"]
    done_id, done = next(iter(manifest["jobs"].items()))
    assert done_id == "backpack_dog/prompts/000_s0" and done["prompt"] == "a <backpack_dog> backpack in the jungle"
    first_file = out / done["files"][0]
    stamp = first_file.stat().st_mtime_ns
    assert not (out / "metrics.csv").exists()

    second = run_figure(server, inputs, out)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1 done, 1 already done, 0 failed, 0 left (of 2)" in second.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["jobs"][done_id]["prompt_id"] == done["prompt_id"]  # not run again
    assert first_file.stat().st_mtime_ns == stamp
    jobs = list(manifest["jobs"].values())
    assert [j["status"] for j in jobs] == ["done", "done"]
    images = [np.asarray(Image.open(out / j["files"][0])) for j in jobs]
    assert all(image.shape == (64, 64, 3) for image in images)
    assert not np.array_equal(images[0], images[1]), "another prompt, another image"

    # the runner's numbers equal the metrics computed here from the same files
    clip, dino = M.ClipEncoder.load(str(inputs["clip"])), M.DinoEncoder.load(str(inputs["dino"]))
    as_tensor = lambda p: torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.float32) / 255).permute(2, 0, 1)
    references = [as_tensor(p) for p in sorted((inputs["subjects"] / "backpack_dog").glob("*.jpg"))]
    want = M.evaluate(clip, dino, [as_tensor(out / j["files"][0]) for j in jobs], references,
                      [j["prompt"] for j in jobs], ["<backpack_dog>"]).summary()
    data = json.loads((out / "metrics.json").read_text())
    row = data["rows"][0]
    assert (row["subject"], row["prompt_file"], row["images"], row["references"]) == ("backpack_dog", "prompts", 2, 2)
    for key in ("clip_t", "clip_i", "dino_i"):
        assert row[key] == pytest.approx(want[key], abs=1e-4), key
    assert [img["prompt"] for img in data["images"]] == ["a backpack in the jungle", "a backpack on the beach"]
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0] == "subject,prompt_file,images,references,clip_t,clip_t_cosine,clip_i,dino_i"
    assert lines[1].startswith("backpack_dog,prompts,2,2,") and lines[2].startswith("mean,prompts,2,2,")

    other = run_figure(server, inputs, out, "--seeds", "0", "--steps", "3")
    assert other.returncode == 2 and "holds a run with other settings (steps)" in other.stderr


def test_failed_jobs_are_recorded_and_the_server_keeps_serving(server, inputs, artifacts):
    out = artifacts / "runner_failed"
    shutil.rmtree(out, ignore_errors=True)
    result = run_figure(server, inputs, out, "--concept", "missing_{subject}.safetensors", "--no-metrics")
    assert result.returncode == 1 and "run again to retry" in result.stderr
    jobs = json.loads((out / "manifest.json").read_text())["jobs"]
    assert [j["status"] for j in jobs.values()] == ["failed", "failed"]
    assert all("missing_backpack_dog.safetensors" in j["error"] for j in jobs.values())
    assert server.alive()


def test_bad_arguments_are_refused_before_any_job(server, inputs, artifacts, tmp_path):
    no_output = {k: v for k, v in json.loads(WORKFLOW.read_text()).items() if v["class_type"] != "SaveImage"}
    (tmp_path / "w.json").write_text(json.dumps(no_output))
    result = run_figure(server, inputs, tmp_path / "out", "--workflow", str(tmp_path / "w.json"))
    assert result.returncode == 2 and "no node titled param:output" in result.stderr
    result = run_figure(server, inputs, tmp_path / "out", "--clip-model", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "clip model folder" in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "out").exists()


TABLE1 = REPO / "workflows" / "api" / "table1_metrics.json"
SUBJECT_ASSETS = REPO / "workflows" / "assets" / "backpack_dog"


def test_prompt_list_workflow_is_one_job_per_subject(server, inputs, artifacts, tmp_path):
    """table1_metrics.json (a Prompt List) over the shipped subject folder: the runner uploads its photos and
    masks for Load Subject Photos, writes the prompt file into the Prompt List and collects one image per
    prompt from the param:output node only (not the saved metrics table)."""
    subjects = tmp_path / "subjects"
    shutil.copytree(SUBJECT_ASSETS, subjects / "backpack_dog")
    (subjects / "prompts_and_classes.txt").write_text("subject_name,class\nbackpack_dog,backpack\n")
    out = artifacts / "runner_table1"
    shutil.rmtree(out, ignore_errors=True)
    first = run_figure(server, inputs, out, "--workflow", str(TABLE1), "--subjects", str(subjects))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "1 done, 0 already done, 0 failed, 0 left (of 1)" in first.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    (job_id, job), = manifest["jobs"].items()
    assert job_id == "backpack_dog/prompts/all_s0" and job["status"] == "done"
    assert job["files"] == ["images/backpack_dog/prompts/000_s0_0.png", "images/backpack_dog/prompts/001_s0_0.png"]
    assert job["file_prompts"] == ["a <backpack_dog> backpack in the jungle", "a <backpack_dog> backpack on the beach"]
    images = [np.asarray(Image.open(out / f)) for f in job["files"]]
    assert all(image.shape == (64, 64, 3) for image in images) and not np.array_equal(*images)

    uploaded = server.input_dir / "eqdiff_runner" / "backpack_dog"  # what Load Subject Photos read
    assert sorted(p.name for p in uploaded.glob("*.jpg")) == sorted(p.name for p in SUBJECT_ASSETS.glob("*.jpg"))
    assert sorted(p.name for p in (uploaded / "masks").glob("*.png")) == [f"{i:02d}.png" for i in range(5)]
    history = server.get(f"/history/{job['prompt_id']}")[job["prompt_id"]]
    prompt = history["prompt"][2]
    subject_node = next(n for n in prompt.values() if n["class_type"] == "EqDiffLoadSubject")
    assert subject_node["inputs"]["folder"] == "eqdiff_runner/backpack_dog"
    assert len(history["outputs"]) > 1, "the metrics table was saved too, and not collected"

    data = json.loads((out / "metrics.json").read_text())
    row = data["rows"][0]
    assert (row["subject"], row["images"], row["references"]) == ("backpack_dog", 2, 5)
    assert all(np.isfinite(row[k]) for k in ("clip_t", "clip_i", "dino_i"))
    assert [img["prompt"] for img in data["images"]] == ["a backpack in the jungle", "a backpack on the beach"]

    again = run_figure(server, inputs, out, "--workflow", str(TABLE1), "--subjects", str(subjects))
    assert again.returncode == 0 and "0 done, 1 already done" in again.stdout


def training_workflow() -> dict:
    """train.json's Load Subject Photos + FDTE Trainer feeding table1's Prompt List generation (what a
    figure that trains looks like), at 64 px."""
    train = json.loads((REPO / "workflows" / "api" / "train.json").read_text())
    table1 = json.loads(TABLE1.read_text())
    w = {k: train[k] for k in ("1", "2", "3", "4")}
    w["3"]["inputs"]["resolution"] = 64
    w["2"]["inputs"]["size"] = 64
    w["4"]["inputs"].update(batch_size=1, precision="fp32", class_word="wrong", name="wrong", steps=600)
    for k in ("4", "6", "7", "8", "9", "10", "11", "13"):
        w[f"t{k}"] = json.loads(json.dumps(table1[k]))
    w["t5"] = json.loads(json.dumps(table1["5"]))
    w["t5"]["inputs"].update(model=["4", 1], concept=["4", 0], reference=["t4", 0], vae=["1", 2])
    for k in ("t7", "t8"):
        w[k]["inputs"]["clip"] = ["4", 2]
    w["t7"]["inputs"]["text"] = ["t6", 0]
    w["t10"]["inputs"].update(model=["t5", 0], positive=["t7", 0], negative=["t8", 0], latent_image=["t9", 0])
    w["t11"]["inputs"]["samples"] = ["t10", 0]
    w["t13"]["inputs"]["images"] = ["t11", 0]  # Save Image straight from the list: once per prompt
    return w


def test_training_workflow_trains_once_per_subject_with_the_runners_values(server, inputs, artifacts, tmp_path):
    subjects = tmp_path / "subjects"
    shutil.copytree(SUBJECT_ASSETS, subjects / "backpack_dog")
    (subjects / "prompts_and_classes.txt").write_text("subject_name,class\nbackpack_dog,backpack\n")
    (tmp_path / "w.json").write_text(json.dumps(training_workflow()))
    out = artifacts / "runner_train"
    shutil.rmtree(out, ignore_errors=True)
    result = run_figure(server, inputs, out, "--workflow", str(tmp_path / "w.json"), "--subjects", str(subjects),
                        "--train-steps", "2", "--no-metrics")
    assert result.returncode == 0, result.stdout + result.stderr
    (job,) = json.loads((out / "manifest.json").read_text())["jobs"].values()
    assert job["status"] == "done" and len(job["files"]) == 2
    prompt = server.get(f"/history/{job['prompt_id']}")[job["prompt_id"]]["prompt"][2]
    trainer = prompt["4"]["inputs"]
    assert (trainer["class_word"], trainer["name"], trainer["steps"]) == ("backpack", "backpack_dog", 2)
    assert prompt["2"]["inputs"]["folder"] == "eqdiff_runner/backpack_dog"
    assert prompt["t6"]["inputs"]["subject"] == "<backpack_dog> backpack"
