"""Benchmark of the figure runner on Ray: jobs per minute with 1 and with 2 servers, measured one after the
other in this run (the ratio), the scheduling overhead per job, and Table 1's time on N GPUs projected
from the measured per-job times.

    .comfy/venv/bin/python bench/sweep.py [--servers 1 2] [--seeds 3] [--gpus 8]
        [--checkpoint eqdiff_tiny_sd15.safetensors --train-steps 2 --steps 2 --size 64 --train-size 64]

Each server count runs the same sweep with scripts/run_figure.py --table1 (no metrics) in a fresh folder:
the shipped backpack_dog photos and a mirrored copy as a live subject "dog", a training each, then the
first 4 lines of the unstylized list and 2 of the stylized list per seed. The defaults are the built-in
tiny models on the CPU; on a GPU machine give the real checkpoint and sizes (e.g. --checkpoint
/models/v1-5.safetensors --train-steps 600 --steps 50 --size 512 --train-size 512 --train-precision bf16 --class-images 200).

From OUT/jobs.log (driver times) and the manifest (each job's seconds inside its worker: uploads, the
prompt, downloads):
  jobs_per_minute   jobs / (last job end - first job start), Ray's and the servers' start excluded;
                    wall_seconds includes them
  overhead          per job: dispatch (driver's start-to-end minus the worker's seconds: Ray's call, the
                    result's transfer, writing the files and the manifest) and idle (a worker's gap
                    between one job's end and its next start)
  per_job           mean seconds of a training, and of a sampling job as fixed + per image (a fit over
                    the two list lengths, without each server's first sampling job, whose extra time for
                    loading the checkpoint is given apart)
  projection        Table 1 (30 subjects, a training each, 55 unstylized + 22 stylized images per seed)
                    on --gpus workers: the runner's order (trainings first, a subject's samples after its
                    training, each idle worker taking the next job) simulated with the per-job times and
                    the overhead measured with 1 server

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import heapq
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "workflows" / "assets" / "backpack_dog"
PAPER_PROMPTS = REPO / "workflows" / "prompts"
LINES = {"live": 4, "nolive": 4, "style": 2}  # unstylized and stylized lists of different lengths: fixed + per image
TABLE1 = {"subjects": 30, "unstylized": 55, "stylized": 22}


def make_inputs(root: Path) -> tuple[Path, Path]:
    subjects = root / "subjects"
    shutil.copytree(ASSETS, subjects / "backpack_dog")
    (subjects / "dog").mkdir()
    for photo in sorted(ASSETS.glob("*.jpg")):
        with Image.open(photo) as image:
            image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(subjects / "dog" / photo.name)
    (subjects / "prompts_and_classes.txt").write_text("subject_name,class\nbackpack_dog,backpack\ndog,dog\n")
    prompts = root / "prompts"
    prompts.mkdir()
    for name, count in LINES.items():
        lines = (PAPER_PROMPTS / f"prompt_{name}.txt").read_text().splitlines()[:count]
        (prompts / f"prompt_{name}.txt").write_text("\n".join(line.strip() for line in lines))
    return subjects, prompts


def sweep(args, subjects: Path, prompts: Path, out: Path, servers: int, ray_tmp: Path) -> dict:
    cmd = [sys.executable, str(REPO / "scripts" / "run_figure.py"), "--table1", "--subjects", str(subjects),
           "--prompts-dir", str(prompts), "--seeds", *map(str, range(args.seeds)), "--checkpoint", args.checkpoint,
           "--train-steps", str(args.train_steps), "--train-size", str(args.train_size), "--train-precision",
           args.train_precision, "--class-images", str(args.class_images), "--steps", str(args.steps), "--size", str(args.size), "--no-metrics",
           "--out", str(out), "--cpu-servers", str(servers), "--ray-temp-dir", str(ray_tmp)]
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - started
    if result.returncode:
        raise SystemExit(f"run_figure.py with {servers} server(s) failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    events = [json.loads(line) for line in (out / "jobs.log").read_text().splitlines()]
    jobs = json.loads((out / "manifest.json").read_text())["jobs"]
    starts = {e["job"]: e for e in events if e["event"] == "start"}
    ends = {e["job"]: e for e in events if e["event"] == "done"}
    span = max(e["time"] for e in ends.values()) - min(e["time"] for e in starts.values())
    dispatch = [ends[j]["time"] - starts[j]["time"] - jobs[j]["seconds"] for j in ends]
    idle = []
    for worker in {e["worker"] for e in events}:
        mine = sorted((e for e in events if e["worker"] == worker), key=lambda e: e["time"])
        idle += [b["time"] - a["time"] for a, b in zip(mine, mine[1:]) if a["event"] == "done" and b["event"] == "start"]
    # a server's first sampling job also loads the checkpoint: left out of the fit, its extra time reported
    first = {min((e for e in events if e["event"] == "start" and jobs[e["job"]]["kind"] == "sample"
                  and e["worker"] == w), key=lambda e: e["time"])["job"] for w in {e["worker"] for e in events}}
    warm = [j for j in jobs.values() if j["kind"] == "sample" and j["id"] not in first]
    fit = np.polyfit([len(j["files"]) for j in warm], [j["seconds"] for j in warm], 1)
    cold = [jobs[j]["seconds"] - np.polyval(fit, len(jobs[j]["files"])) for j in first]
    return {"servers": servers, "jobs": len(ends), "span_seconds": round(span, 2), "wall_seconds": round(wall, 2),
            "jobs_per_minute": round(60 * len(ends) / span, 3),
            "overhead": {"dispatch_seconds": round(float(np.mean(dispatch)), 3),
                         "idle_seconds": round(float(np.mean(idle)) if idle else 0.0, 3)},
            "per_job": {"train_seconds": round(float(np.mean([j["seconds"] for j in jobs.values() if j["kind"] == "train"])), 3),
                        "sample_fixed_seconds": round(float(fit[1]), 3), "sample_seconds_per_image": round(float(fit[0]), 3),
                        "first_sample_extra_seconds": round(float(np.mean(cold)), 3)}}


def project(measured: dict, gpus: int, seeds: int) -> dict:
    """Table 1 on ``gpus`` workers, simulated in the runner's order with the measured times: trainings
    first, then each subject's sampling jobs; a free worker takes the first job that is ready (a sample
    once its subject's training has ended) or waits for the next training to end."""
    per, overhead = measured["per_job"], sum(measured["overhead"].values())
    duration = {"train": per["train_seconds"]}
    for images in (TABLE1["unstylized"], TABLE1["stylized"]):
        duration[images] = per["sample_fixed_seconds"] + images * per["sample_seconds_per_image"]
    subjects = range(TABLE1["subjects"])
    todo = [(s, "train") for s in subjects] + [(s, n) for s in subjects for n in (TABLE1["unstylized"], TABLE1["stylized"])
                                               for _ in range(seeds)]
    trained: dict[int, float] = {}
    free = [(0.0, w) for w in range(gpus)]
    end = 0.0
    while todo:
        now, worker = heapq.heappop(free)
        job = next((j for j in todo if j[1] == "train" or trained.get(j[0], float("inf")) <= now), None)
        if job is None:  # every job left waits for a training still running
            heapq.heappush(free, (min(t for t in trained.values() if t > now), worker))
            continue
        todo.remove(job)
        finish = now + duration[job[1]] + overhead
        if job[1] == "train":
            trained[job[0]] = finish
        end = max(end, finish)
        heapq.heappush(free, (finish, worker))
    serial = sum(duration[kind] + overhead for _, kind in
                 [(s, "train") for s in subjects] + [(s, n) for s in subjects for n in (TABLE1["unstylized"], TABLE1["stylized"])
                                                     for _ in range(seeds)])
    return {"gpus": gpus, "seeds": seeds, "seconds": round(end, 1), "hours": round(end / 3600, 3),
            "one_worker_seconds": round(serial, 1), "speedup": round(serial / end, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per prompt set (jobs per subject and set)")
    parser.add_argument("--checkpoint", default="eqdiff_tiny_sd15.safetensors")
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--train-precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--class-images", type=int, default=2, help="class images per training (the authors: 200)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--gpus", type=int, default=8, help="workers in the projection")
    parser.add_argument("--table1-seeds", type=int, default=1, help="seeds per prompt set in the projection")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="eqsweep", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        subjects, prompts = make_inputs(root)
        runs = [sweep(args, subjects, prompts, root / f"out{n}", n, root / f"ray{n}") for n in args.servers]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    first = runs[0]
    print(json.dumps({
        "settings": {k: getattr(args, k) for k in ("checkpoint", "train_steps", "train_size", "steps", "size", "seeds")},
        "runs": runs,
        "ratio": {f"{r['servers']}_vs_{first['servers']}": round(r["jobs_per_minute"] / first["jobs_per_minute"], 3)
                  for r in runs[1:]},
        "projection": project(first, args.gpus, args.table1_seeds),
    }, indent=1))


if __name__ == "__main__":
    main()
