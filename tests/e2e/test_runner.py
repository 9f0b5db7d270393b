"""scripts/run_figure.py on a real local Ray cluster with real ComfyUI servers (the tiny models, CPU): Table 1
over 2 subjects x 2 prompts (one unstylized, one stylized) x 2 seeds with training. One server gives the
reference; two servers, one of them killed in the middle of a job and the driver stopped and restarted,
must give the same files and the same table and run every job once (the killed server's job twice). A
driver killed outright leaves no server behind and resumes too."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from comfy_env import REPO
from eqdiff_core import metrics as M
from metric_models import write_tiny_clip, write_tiny_dino

pytestmark = pytest.mark.slow

RUNNER = REPO / "scripts" / "run_figure.py"
ASSETS = REPO / "workflows" / "assets" / "backpack_dog"
JOBS = 10  # 2 trainings + 2 subjects x 2 prompt sets x 2 seeds (a Prompt List: one job per set and seed)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two subjects (backpack_dog with its masks; 'dog', a live subject, from the same photos mirrored), one
    prompt per list, tiny metric models, and a short folder for Ray's sessions (its socket paths are limited)."""
    root = tmp_path_factory.mktemp("sweep_inputs")
    subjects = root / "subjects"
    shutil.copytree(ASSETS, subjects / "backpack_dog")
    (subjects / "dog").mkdir()
    for photo in sorted(ASSETS.glob("*.jpg"))[:3]:
        with Image.open(photo) as image:
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(subjects / "dog" / photo.name)
    (subjects / "prompts_and_classes.txt").write_text("subject_name,class\nbackpack_dog,backpack\ndog,dog\n")
    prompts = root / "prompts"
    prompts.mkdir()
    for name, line in {"live": "a {} in the jungle", "nolive": "a {} on the beach", "style": "watercolor painting of a {}"}.items():
        (prompts / f"prompt_{name}.txt").write_text(line)
    ray_tmp = Path(tempfile.mkdtemp(prefix="eqr", dir="/tmp"))
    yield {"subjects": subjects, "prompts": prompts, "clip": write_tiny_clip(root / "clip"),
           "dino": write_tiny_dino(root / "dino"), "ray_tmp": ray_tmp}
    end_processes(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def command(inputs, out: Path, servers: int) -> list[str]:
    return [sys.executable, str(RUNNER), "--table1", "--subjects", str(inputs["subjects"]), "--prompts-dir",
            str(inputs["prompts"]), "--seeds", "0", "1", "--checkpoint", "eqdiff_tiny_sd15.safetensors",
            "--train-steps", "2", "--train-size", "64", "--train-precision", "fp32", "--class-images", "2", "--steps", "2", "--size", "64",
            "--clip-model", str(inputs["clip"]), "--dino-model", str(inputs["dino"]), "--metrics-device", "cpu",
            "--out", str(out), "--cpu-servers", str(servers), "--ray-temp-dir", str(inputs["ray_tmp"])]


def processes_with(text: str) -> list[int]:
    """Processes whose command line holds ``text`` (this test's Ray session folder or its servers' folders)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(entry.name))
        except OSError:
            pass  # gone meanwhile
    return [pid for pid in pids if pid != os.getpid()]


def end_processes(marker: Path, wait: float = 0.0) -> list[int]:
    """Processes of a killed driver's Ray session (or its servers): given ``wait`` seconds to end by
    themselves, then killed by pid. Returns those that had to be killed."""
    deadline = time.monotonic() + wait
    while processes_with(str(marker)) and time.monotonic() < deadline:
        time.sleep(1)
    left = processes_with(str(marker))
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def events(out: Path) -> list[dict]:
    path = out / "jobs.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def busy_server(out: Path) -> int | None:
    """The pid of a ComfyUI server of this run that is running a prompt."""
    for pid in processes_with(f"{out}/workers"):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"main.py" not in cmd:
            continue
        port = cmd[cmd.index(b"--port") + 1].decode()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/queue", timeout=2) as answer:
                if json.load(answer)["queue_running"]:
                    return pid
        except OSError:
            pass
    return None


@pytest.fixture(scope="module")
def reference(inputs, artifacts):
    """The sweep on one server: the reference for every other run."""
    out = artifacts / "sweep_one_server"
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(command(inputs, out, 1), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return out, result


def same_content(a: Path, b: Path) -> bool:
    """Images: the same pixels (ComfyUI writes the concept file's time into the PNG's prompt text). Concepts:
    the same tensors and metadata (safetensors writes its metadata in a different order in each process)."""
    if a.suffix == ".png":
        return np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        return (fa.metadata() == fb.metadata() and set(fa.keys()) == set(fb.keys())
                and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()))


def image_as_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255).permute(2, 0, 1)


def test_table1_on_one_server(reference, inputs):
    out, result = reference
    assert f"{JOBS} done, 0 already done, 0 failed, 0 left (of {JOBS})" in result.stdout
    jobs = json.loads((out / "manifest.json").read_text())["jobs"]
    assert sorted(jobs) == sorted([f"{s}/train" for s in ("backpack_dog", "dog")] + [
        f"{s}/{p}/all_s{seed}" for s in ("backpack_dog", "dog") for p in ("unstylized", "stylized") for seed in (0, 1)])
    assert {j["status"] for j in jobs.values()} == {"done"}
    assert jobs["dog/unstylized/all_s0"]["file_prompts"] == ["a <dog> dog in the jungle"], "dog is live"
    assert jobs["backpack_dog/unstylized/all_s1"]["files"] == ["images/backpack_dog/unstylized/000_s1_0.png"]
    assert jobs["backpack_dog/stylized/all_s0"]["file_prompts"] == ["watercolor painting of a <backpack_dog> backpack"]
    image = np.asarray(Image.open(out / jobs["dog/stylized/all_s1"]["files"][0]))
    assert image.shape == (64, 64, 3)

    # the concept was trained with the runner's values and reached the sampling jobs as a file
    with safe_open(str(out / "concepts" / "dog.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["eqdiff_metadata"])
    assert (meta["class_word"], meta["name"]) == ("dog", "dog")
    assert (meta["settings"]["resolution"], meta["steps"], meta["precision"]) == (64, 2, "fp32")

    # the table's numbers are eqdiff_core's metrics of the saved files
    clip, dino = M.ClipEncoder.load(str(inputs["clip"])), M.DinoEncoder.load(str(inputs["dino"]))
    chosen = [jobs[f"dog/unstylized/all_s{seed}"] for seed in (0, 1)]
    references = [image_as_tensor(p) for p in sorted((inputs["subjects"] / "dog").glob("*.jpg"))]
    want = M.evaluate(clip, dino, [image_as_tensor(out / j["files"][0]) for j in chosen], references,
                      [j["file_prompts"][0] for j in chosen], ["<dog>"]).summary()
    table = (out / "table.csv").read_text().splitlines()
    assert table[0] == ("subject,class,unstylized CLIP-T,unstylized CLIP-I,unstylized DINO-I,stylized CLIP-T,"
                        "stylized CLIP-I,stylized DINO-I")
    dog = dict(zip(table[0].split(","), next(line for line in table if line.startswith("dog,")).split(",")))
    for key, column in (("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino_i", "DINO-I")):
        assert float(dog[f"unstylized {column}"]) == pytest.approx(want[key], abs=1e-5), column
    assert table[-1].startswith("mean,,") and (out / "table.md").is_file()
    assert Image.open(out / "table.png").size[0] > 300

    info = json.loads((out / "run_info.json").read_text())
    assert info["seeds"] == [0, 1] and info["settings"]["checkpoint"] == "eqdiff_tiny_sd15.safetensors"
    assert {"torch", "ray", "transformers"} <= set(info["driver"]) and set(info["metric_models"]) == {"clip", "dino"}
    (session,) = info["sessions"]
    assert session["workers"][0]["comfyui"] and session["counts"]["done"] == JOBS

    # a finished sweep run again does nothing: no Ray, no job, no measuring, no file written
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = subprocess.run(command(inputs, out, 1), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"all {JOBS} jobs are done" in again.stdout and "up to date" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_two_servers_lose_nothing_when_a_server_is_killed_and_the_driver_stopped(reference, inputs, artifacts):
    out = artifacts / "sweep_two_servers"
    shutil.rmtree(out, ignore_errors=True)
    log = open(artifacts / "sweep_two_servers.log", "w")
    driver = subprocess.Popen(command(inputs, out, 2), stdout=log, stderr=subprocess.STDOUT)
    try:
        # one server killed while it runs a prompt: its job goes to the other worker
        wait_for(lambda: any(e["event"] == "done" for e in events(out)), 600, "a first finished job")
        os.kill(wait_for(lambda: busy_server(out), 300, "a server running a job"), signal.SIGKILL)
        lost = wait_for(lambda: [e for e in events(out) if e["event"] == "lost"], 120, "the lost job")[0]
        again = wait_for(lambda: [e for e in events(out) if e["event"] == "done" and e["job"] == lost["job"]], 300,
                         f"{lost['job']} run again")[0]
        assert again["worker"] != lost["worker"], "the lost job went to the other worker"
        # then the driver is stopped while jobs are left: it lets the running ones finish
        done_before = {e["job"] for e in events(out) if e["event"] == "done"}
        assert len(done_before) < JOBS, "the sweep ended before the driver could be stopped"
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(300) == 130
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    assert "stopping: no new jobs" in (artifacts / "sweep_two_servers.log").read_text()
    first_session = events(out)
    ended = [e["job"] for e in first_session if e["event"] in ("done", "lost")]
    assert sorted(e["job"] for e in first_session if e["event"] == "start") == sorted(ended), "the stop drained"
    assert not end_processes(out / "workers", wait=15) and not end_processes(inputs["ray_tmp"], wait=15), \
        "a stopped driver leaves no server and no Ray process"
    done_before = {e["job"] for e in first_session if e["event"] == "done"}

    resumed = subprocess.run(command(inputs, out, 2), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-6000:] + resumed.stderr[-6000:]
    assert f"{len(done_before)} already done" in resumed.stdout

    everything = events(out)
    done = [e["job"] for e in everything if e["event"] == "done"]
    assert sorted(done) == sorted(set(done)) and len(done) == JOBS, "every job finished exactly once"
    starts = [e["job"] for e in everything if e["event"] == "start"]
    assert sorted(starts) == sorted(done + [lost["job"]]), "no job ran twice but the one whose server was killed"
    ref_out = reference[0]
    ref_jobs = json.loads((ref_out / "manifest.json").read_text())["jobs"]
    jobs = json.loads((out / "manifest.json").read_text())["jobs"]
    assert {k: j["files"] for k, j in jobs.items()} == {k: j["files"] for k, j in ref_jobs.items()}
    for job in ref_jobs.values():
        for file in job["files"]:
            assert same_content(out / file, ref_out / file), f"{file} differs from the one-server run"
    assert (out / "table.csv").read_text() == (ref_out / "table.csv").read_text()
    assert json.loads((out / "metrics.json").read_text())["rows"] == json.loads((ref_out / "metrics.json").read_text())["rows"]
    assert not processes_with(str(out / "workers")) and not processes_with(str(inputs["ray_tmp"]))


def test_a_killed_driver_leaves_no_server_and_failures_are_recorded(reference, inputs, tmp_path, artifacts):
    """generate.json (one job per prompt) with --concepts: a broken concept fails its subject's jobs with the
    file named, the others finish; the driver SIGKILLed in the middle takes its servers with it, and the next
    run (the concept mended) does the rest."""
    concepts = tmp_path / "concepts"
    concepts.mkdir()
    shutil.copy(reference[0] / "concepts" / "dog.safetensors", concepts)
    good = (reference[0] / "concepts" / "backpack_dog.safetensors").read_bytes()
    (concepts / "backpack_dog.safetensors").write_bytes(good[: len(good) // 3])
    (tmp_path / "p.txt").write_text("a {} in the jungle\na {} on the beach\na {} in the snow")
    out = artifacts / "runner_generate"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(RUNNER), "--workflow", str(REPO / "workflows" / "api" / "generate.json"),
           "--concepts", str(concepts), "--subjects", str(inputs["subjects"]), "--prompts", str(tmp_path / "p.txt"),
           "--checkpoint", "eqdiff_tiny_sd15.safetensors", "--steps", "2", "--size", "64", "--no-metrics",
           "--out", str(out), "--ray-temp-dir", str(inputs["ray_tmp"])]
    with open(artifacts / "runner_generate.log", "w") as log:
        driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: any(e["event"] == "done" for e in events(out)), 600, "a first finished job")
        finally:
            driver.kill()
            driver.wait(30)
    assert not end_processes(out / "workers", wait=30), "a ComfyUI server outlived its killed driver"
    end_processes(inputs["ray_tmp"], wait=5)  # Ray's agents would end by themselves within about a minute
    jobs = json.loads((out / "manifest.json").read_text())["jobs"]
    assert [jobs[f"backpack_dog/p/00{i}_s0"]["status"] for i in range(3)] == ["failed"] * 3
    assert "backpack_dog.safetensors" in jobs["backpack_dog/p/000_s0"]["error"]
    assert jobs["dog/p/000_s0"]["files"] == ["images/dog/p/000_s0_0.png"]
    done_before = sum(j["status"] == "done" for j in jobs.values())

    (concepts / "backpack_dog.safetensors").write_bytes(good)
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{6 - done_before} done, {done_before} already done, 0 failed, 0 left (of 6)" in resumed.stdout
    assert np.asarray(Image.open(out / "images" / "backpack_dog" / "p" / "002_s0_0.png")).shape == (64, 64, 3)
