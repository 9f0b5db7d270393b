"""Headless figure runner: one API workflow over DreamBooth subjects x prompts on a running ComfyUI,
then CLIP-T / CLIP-I / DINO-I per subject.

    python scripts/run_figure.py --server http://127.0.0.1:8188 --workflow workflows/api/generate.json \\
        --subjects /data/dreambooth --subset backpack_dog cat --prompts prompts/prompt_nolive.txt \\
        --clip-model models/eqdiff_metrics/clip-vit-base-patch32 --dino-model models/eqdiff_metrics/dino-vits16 \\
        --out runs/table1

Parameters. A node of the workflow whose ``_meta.title`` starts with ``param:`` receives values from the
runner: ``param:NAME[,NAME...]`` optionally followed by a space and any text (``param:seed,steps
Equilibrated Sampler``). Each NAME sets these inputs of that node (every one of them the node has):

    checkpoint  ckpt_name         --checkpoint (left as in the workflow when not given)
    concept     concept_name      --concept with {subject} filled in (default "{subject}.safetensors")
    token       token             --token with {subject} filled in (default "<{subject}>")
    reference   image             the subject's photo number --reference-index, uploaded to the server
    prompt      text              the prompt line, "{}" replaced by "<token> <class word>"
    seed        seed, noise_seed  each of --seeds
    steps       steps             --steps (left as in the workflow when not given)
    size        width, height     --size (left as in the workflow when not given)
    output      filename_prefix   a per-job prefix under eqdiff_runner/; only the images of these nodes are
                                  collected
    subject     folder            the subject's photos (and masks/<photo>.png, if the subject folder has
                                  them), uploaded to the server's input/eqdiff_runner/<subject>/ (Load
                                  Subject Photos)
    class_word  class_word        the subject's class word (FDTE Trainer)
    name        name              --name with {subject} filled in (default "{subject}"; FDTE Trainer, Save
                                  Concept)
    train_steps steps             --train-steps (FDTE Trainer; left as in the workflow when not given)

A workflow needs ``param:prompt`` and ``param:output``; an option given for a parameter no node carries
is an error. Jobs are subject x prompt file x prompt x seed.

Prompt List workflows. When the ``param:prompt`` node is a Prompt List (EqDiffPromptList) the runner
writes a whole prompt file into it (list "custom", every line, the subject phrase "<token> <class word>")
and a job is subject x prompt file x seed: the workflow samples every prompt of the file in one run and
its param:output node saves them (one image per prompt, or images_per_prompt each, in prompt order).
A workflow that trains (param:subject, class_word, name, train_steps) therefore trains once per job:
use it with a Prompt List (one training per subject, prompt file and seed); with a plain prompt node
it would train again for every prompt.

Subjects. ``--subjects`` is a folder with one sub-folder of photos per subject (the DreamBooth layout)
and ``prompts_and_classes.txt`` (the "subject_name,class" lines) giving each subject's class word;
``--classes`` names another such file.

Resume. ``OUT/manifest.json`` records every finished job (its files, prompt id, seconds) and is written
atomically after each job. A re-run with the same settings skips finished jobs whose files are there
and retries failed ones; other settings in the same OUT are refused. ``--max-jobs N`` stops after N
new jobs. Images go to ``OUT/images/<subject>/<prompt file>/<NNN>_s<seed>_<k>.png``.

Metrics. When every job is done the runner computes the metrics itself with eqdiff_core/metrics.py
(loaded from this repository; needs torch and transformers, e.g. ComfyUI's own venv) from the local
model folders ``--clip-model`` and ``--dino-model``: each subject's generated images against all its
photos, per prompt file. It writes ``OUT/metrics.csv`` (one row per subject and prompt file, then the
mean over subjects per prompt file) and ``OUT/metrics.json`` (the same plus every image's scores).
``--no-metrics`` skips this. The HTTP side uses only the standard library and requests.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
TITLE = re.compile(r"^param:([\w,]+)(?:\s.*)?$", re.S)
TITLE_REST = re.compile(r"^param:[\w,]+\s*")
PARAM_INPUTS = {
    "checkpoint": ("ckpt_name",), "concept": ("concept_name",), "token": ("token",), "reference": ("image",),
    "prompt": ("text",), "seed": ("seed", "noise_seed"), "steps": ("steps",), "size": ("width", "height"),
    "output": ("filename_prefix",), "subject": ("folder",), "class_word": ("class_word",), "name": ("name",),
    "train_steps": ("steps",),
}
PROMPT_LIST = "EqDiffPromptList"
REQUIRED_PARAMS = ("prompt", "output")


class RunnerError(RuntimeError):
    """A problem with the arguments, the workflow or the out folder, stated for the user."""


# -- files ---------------------------------------------------------------------------------------------
def write_atomic(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_prompts(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_classes(path: Path) -> dict[str, str]:
    """``subject_name,class`` lines (DreamBooth's prompts_and_classes.txt; other lines are ignored)."""
    classes = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"\s*([\w-]+)\s*,\s*([^,]+?)\s*", line)
        if m and m.group(1) != "subject_name":
            classes[m.group(1)] = m.group(2)
    return classes


def subject_photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)


# -- the workflow's parameters -------------------------------------------------------------------------
def find_params(workflow: dict) -> dict[str, list[str]]:
    """Parameter name -> ids of the nodes titled ``param:...`` that carry it; checks the convention."""
    params: dict[str, list[str]] = {}
    for node_id, node in workflow.items():
        m = TITLE.match(node.get("_meta", {}).get("title", ""))
        if not m:
            continue
        for name in filter(None, m.group(1).split(",")):
            if name not in PARAM_INPUTS:
                raise RunnerError(f"workflow node {node_id}: unknown parameter '{name}' in its title; known: "
                                  f"{', '.join(PARAM_INPUTS)}")
            if node.get("class_type") == PROMPT_LIST and name != "prompt":
                raise RunnerError(f"workflow node {node_id} (Prompt List) is titled param:{name}; a Prompt List "
                                  "can only be param:prompt")
            if name == "prompt" and node.get("class_type") == PROMPT_LIST:
                pass  # filled by fill_prompt_list
            elif not any(i in node.get("inputs", {}) for i in PARAM_INPUTS[name]):
                raise RunnerError(f"workflow node {node_id} ({node.get('class_type')}) is titled param:{name} but "
                                  f"has none of the inputs {', '.join(PARAM_INPUTS[name])}")
            params.setdefault(name, []).append(node_id)
    lists = [k for k, node in workflow.items() if node.get("class_type") == PROMPT_LIST]
    if lists and set(params.get("prompt", [])) != set(lists):
        raise RunnerError(f"workflow nodes {', '.join(lists)}: a workflow with a Prompt List must title it (and only "
                          "it) param:prompt, so that the runner fills in each prompt file")
    missing = [p for p in REQUIRED_PARAMS if p not in params]
    if missing:
        raise RunnerError(f"the workflow has no node titled {' or '.join('param:' + p for p in missing)}; title the "
                          "prompt text node 'param:prompt' and the save node 'param:output' (see --help)")
    return params


def output_names(workflow: dict, params: dict[str, list[str]]) -> dict[str, str]:
    """A file-name-safe label per param:output node: its title after the param: part (else its id),
    made unique with the id."""
    labels: dict[str, str] = {}
    for node_id in params.get("output", []):
        rest = TITLE_REST.sub("", workflow[node_id].get("_meta", {}).get("title", ""))
        label = re.sub(r"[^\w.-]+", "_", rest).strip("_") or f"node{node_id}"
        labels[node_id] = f"{label}_{node_id}" if label in labels.values() else label
    return labels


def uses_prompt_list(workflow: dict, params: dict[str, list[str]]) -> bool:
    return any(workflow[k].get("class_type") == PROMPT_LIST for k in params.get("prompt", []))


def fill_prompt_list(workflow: dict, params: dict[str, list[str]], lines: list[str], phrase: str) -> dict:
    """The Prompt List(s) titled param:prompt set to every line of a prompt file with this subject phrase."""
    for node_id in params.get("prompt", []):
        inputs = workflow[node_id]["inputs"]
        inputs.update({"list": "custom", "custom_prompts": "\n".join(lines), "subject": phrase, "first_index": 0,
                       "count": 0})
    return workflow


def fill(workflow: dict, params: dict[str, list[str]], values: dict) -> dict:
    """A copy of the workflow with each parameter in ``values`` written to its nodes' inputs."""
    filled = json.loads(json.dumps(workflow))
    for name, value in values.items():
        for node_id in params.get(name, []):
            if filled[node_id].get("class_type") == PROMPT_LIST:
                continue  # fill_prompt_list
            inputs = filled[node_id]["inputs"]
            for key in PARAM_INPUTS[name]:
                if key in inputs:
                    inputs[key] = value
    return filled


# -- the server ----------------------------------------------------------------------------------------
class Server:
    """The few ComfyUI endpoints the runner needs."""

    def __init__(self, url: str, timeout: float):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        self.http = requests.Session()

    def upload_subject(self, folder: Path, subfolder: str) -> str:
        """Every photo of a subject folder, and its masks/<photo>.png when there, into input/<subfolder>/;
        returns the folder name Load Subject Photos takes."""
        for photo in subject_photos(folder):
            self.upload(photo, subfolder)
        masks = folder / "masks"
        if masks.is_dir():
            for mask in sorted(masks.glob("*.png")):
                self.upload(mask, f"{subfolder}/masks")
        return subfolder

    def upload(self, path: Path, subfolder: str) -> str:
        """POST /upload/image; returns the name LoadImage takes (``subfolder/file``)."""
        with open(path, "rb") as f:
            answer = self.http.post(f"{self.url}/upload/image", files={"image": (path.name, f)},
                                    data={"subfolder": subfolder, "type": "input", "overwrite": "true"}, timeout=60)
        answer.raise_for_status()
        body = answer.json()
        return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]

    def queue(self, prompt: dict) -> str:
        answer = self.http.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": self.client_id}, timeout=60)
        if answer.status_code != 400:
            answer.raise_for_status()
        body = answer.json()
        if answer.status_code == 400 or body.get("node_errors"):
            raise JobFailed(f"the server rejected the workflow: {json.dumps(body.get('node_errors') or body)[:2000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str) -> dict:
        """Polls /history until the prompt ends; its history entry, or JobFailed with the server's error."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            history = self.http.get(f"{self.url}/history/{prompt_id}", timeout=60).json()
            entry = history.get(prompt_id)
            if entry:
                status = entry.get("status", {})
                if status.get("status_str") == "error":
                    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                    detail = errors[0] if errors else status
                    raise JobFailed(f"the workflow failed: {json.dumps(detail)[:2000]}")
                if status.get("completed"):
                    return entry
            time.sleep(0.25)
        raise JobFailed(f"prompt {prompt_id} did not finish within {self.timeout:.0f} s")

    def outputs(self, entry: dict, node_ids: list[str]) -> dict[str, list[bytes]]:
        """Node id -> the images that node of a finished prompt saved (type "output"), downloaded through
        /view in the order the node saved them; only the given nodes, each listed."""
        files: dict[str, list[bytes]] = {}
        for node_id in node_ids:
            files[node_id] = []
            for item in entry.get("outputs", {}).get(node_id, {}).get("images", []):
                if item.get("type") == "output":
                    params = {k: item[k] for k in ("filename", "subfolder", "type") if k in item}
                    answer = self.http.get(f"{self.url}/view", params=params, timeout=120)
                    answer.raise_for_status()
                    files[node_id].append(answer.content)
        return files


class JobFailed(RuntimeError):
    """One job did not produce images; the run goes on and the job is retried next time."""


# -- the run -------------------------------------------------------------------------------------------
def plan_jobs(subjects: list[str], classes: dict[str, str], prompt_files: list[Path], seeds: list[int],
              token_pattern: str, prompt_list: bool = False) -> list[dict]:
    """subject x prompt file x prompt x seed; with a Prompt List subject x prompt file x seed, each job
    holding the file's lines (``lines``) and their prompts (``prompts``, also joined as ``prompt``)."""
    jobs = []
    for subject in subjects:
        token = token_pattern.format(subject=subject)
        phrase = f"{token} {classes[subject]}"
        for prompt_file in prompt_files:
            if prompt_list:
                lines = read_prompts(prompt_file)
                prompts = [line.replace("{}", phrase) for line in lines]
                for seed in seeds:
                    jobs.append({"id": f"{subject}/{prompt_file.stem}/all_s{seed}", "subject": subject,
                                 "prompt_file": prompt_file.stem, "index": None, "seed": seed, "lines": lines,
                                 "phrase": phrase, "prompts": prompts, "prompt": "\n".join(prompts), "token": token,
                                 "class_word": classes[subject]})
                continue
            for index, line in enumerate(read_prompts(prompt_file)):
                prompt = line.replace("{}", phrase)
                for seed in seeds:
                    jobs.append({"id": f"{subject}/{prompt_file.stem}/{index:03d}_s{seed}", "subject": subject,
                                 "prompt_file": prompt_file.stem, "index": index, "seed": seed,
                                 "prompt": prompt, "token": token, "class_word": classes[subject]})
    return jobs


def load_manifest(path: Path, settings: dict) -> dict:
    if not path.exists():
        return {"settings": settings, "jobs": {}}
    manifest = json.loads(path.read_text())
    if manifest.get("settings") != settings:
        changed = sorted(k for k in set(settings) | set(manifest.get("settings", {}))
                         if settings.get(k) != manifest.get("settings", {}).get(k))
        raise RunnerError(f"{path.parent} holds a run with other settings ({', '.join(changed)}); resume it with the "
                          "same arguments or use another --out")
    return manifest


def job_done(job: dict, record: dict | None, out: Path) -> bool:
    """Finished with this very prompt, and its images are still there."""
    return bool(record and record.get("status") == "done" and record.get("prompt") == job["prompt"]
                and record.get("files") and all((out / f).is_file() for f in record["files"]))


def run_jobs(args, server: Server, workflow: dict, params: dict, jobs: list[dict], manifest: dict) -> dict:
    """Runs the unfinished jobs; returns counts of done / skipped / failed / left."""
    manifest_path = args.out / "manifest.json"
    uploaded: dict[str, str] = {}
    subject_folders: dict[str, str] = {}
    output_labels = output_names(workflow, params)
    counts = {"done": 0, "skipped": 0, "failed": 0, "left": 0}
    for n, job in enumerate(jobs, 1):
        if job_done(job, manifest["jobs"].get(job["id"]), args.out):
            counts["skipped"] += 1
            continue
        if args.max_jobs is not None and counts["done"] + counts["failed"] >= args.max_jobs:
            counts["left"] += 1
            continue
        subject = job["subject"]
        started = time.monotonic()
        try:
            if subject not in uploaded:
                photo = subject_photos(args.subjects / subject)[args.reference_index]
                uploaded[subject] = server.upload(photo, f"eqdiff_runner/{subject}")
            if "subject" in params and subject not in subject_folders:
                subject_folders[subject] = server.upload_subject(args.subjects / subject, f"eqdiff_runner/{subject}")
            values = {"prompt": job["prompt"], "seed": job["seed"], "token": job["token"],
                      "concept": args.concept.format(subject=subject), "reference": uploaded[subject],
                      "output": f"eqdiff_runner/{job['id'].replace('/', '_')}",
                      "class_word": job["class_word"], "name": args.name.format(subject=subject),
                      "subject": subject_folders.get(subject)}
            values |= {k: v for k, v in (("checkpoint", args.checkpoint), ("steps", args.steps),
                                         ("train_steps", args.train_steps), ("size", args.size)) if v is not None}
            filled = fill(workflow, params, {k: v for k, v in values.items() if v is not None})
            if job["index"] is None:
                fill_prompt_list(filled, params, job["lines"], job["phrase"])
            prompt_id = server.queue(filled)
            saved = server.outputs(server.wait(prompt_id), params["output"])
            empty = [node_id for node_id, images in saved.items() if not images]
            if empty:
                raise JobFailed(f"workflow node {empty[0]} (param:output) saved no image; it must be a Save Image")
            files, file_prompts, file_outputs = [], [], []
            for node_id, images in saved.items():
                # several param:output nodes (variants of a figure): their label goes into the names
                label = output_labels[node_id] if len(saved) > 1 else ""
                part = f"_{label}" if label else ""
                if job["index"] is None:
                    if len(images) % len(job["prompts"]):
                        raise JobFailed(f"workflow node {node_id} saved {len(images)} images for {len(job['prompts'])} "
                                        "prompts; it must save the same number for every prompt")
                    per = len(images) // len(job["prompts"])
                    names = [f"{i // per:03d}_s{job['seed']}{part}_{i % per}.png" for i in range(len(images))]
                    file_prompts += [job["prompts"][i // per] for i in range(len(images))]
                else:
                    names = [f"{job['index']:03d}_s{job['seed']}{part}_{k}.png" for k in range(len(images))]
                    file_prompts += [job["prompt"]] * len(images)
                file_outputs += [label] * len(images)
                for name, data in zip(names, images):
                    rel = Path("images") / subject / job["prompt_file"] / name
                    write_atomic(args.out / rel, data)
                    files.append(rel.as_posix())
            record = {**job, "status": "done", "files": files, "prompt_id": prompt_id,
                      "seconds": round(time.monotonic() - started, 2), "file_prompts": file_prompts}
            if len(saved) > 1:
                record["file_outputs"] = file_outputs
            counts["done"] += 1
            print(f"[{n}/{len(jobs)}] {job['id']}: {len(files)} image(s) in {record['seconds']} s", flush=True)
        except JobFailed as err:
            record = {**job, "status": "failed", "error": str(err)}
            counts["failed"] += 1
            print(f"[{n}/{len(jobs)}] {job['id']} FAILED: {err}", file=sys.stderr, flush=True)
        manifest["jobs"][job["id"]] = record
        write_atomic(manifest_path, json.dumps(manifest, indent=1))
    return counts


# -- metrics -------------------------------------------------------------------------------------------
def load_metrics_module():
    """eqdiff_core/metrics.py by its path: it imports nothing of the pack, so the runner needs neither
    ComfyUI nor the pack on sys.path."""
    spec = importlib.util.spec_from_file_location("eqdiff_metrics", REPO / "eqdiff_core" / "metrics.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def read_image(path: Path):
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)


def image_entries(record: dict) -> list[tuple[str, str, str]]:
    """(prompt, file, output label) of each image of a finished job (older manifests: the job's prompt, no label)."""
    n = len(record["files"])
    return list(zip(record.get("file_prompts") or [record["prompt"]] * n, record["files"],
                    record.get("file_outputs") or [""] * n))


def compute_metrics(args, jobs: list[dict], manifest: dict) -> None:
    import torch

    metrics = load_metrics_module()
    device = args.metrics_device if args.metrics_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    clip = metrics.ClipEncoder.load(str(args.clip_model), args.preprocessing)
    dino = metrics.DinoEncoder.load(str(args.dino_model), args.preprocessing)
    clip.model.to(device)
    dino.model.to(device)
    rows, images = [], []
    # (prompt, file, output label) of every image; the label is set when the workflow saves several variants
    # (several param:output nodes), which then get rows of their own
    per_file = {j["id"]: image_entries(manifest["jobs"][j["id"]]) for j in jobs}
    outputs = list(dict.fromkeys(o for entries in per_file.values() for _, _, o in entries))
    for subject in dict.fromkeys(job["subject"] for job in jobs):
        references = [read_image(p) for p in subject_photos(args.subjects / subject)]
        for prompt_file in dict.fromkeys(job["prompt_file"] for job in jobs):
            chosen = [j for j in jobs if j["subject"] == subject and j["prompt_file"] == prompt_file]
            for output in outputs:
                files = [(p, f) for j in chosen for p, f, o in per_file[j["id"]] if o == output]
                if not files:
                    continue
                result = metrics.evaluate(clip, dino, [read_image(args.out / f) for _, f in files], references,
                                          [p for p, _ in files], [chosen[0]["token"]], args.clip_t_weight)
                where = {"subject": subject, "prompt_file": prompt_file} | ({"output": output} if output else {})
                rows.append({**where, "images": len(files), "references": len(references), **result.summary()})
                images += [{**where, "file": f, **row} for (_, f), row in zip(files, result.rows()[:-1])]
                print(f"[metrics] {' / '.join(where.values())}: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in result.summary().items()))
    for group in dict.fromkeys((r["prompt_file"], r.get("output")) for r in rows):
        part = [r for r in rows if (r["prompt_file"], r.get("output")) == group]
        where = {"subject": "mean", "prompt_file": group[0]} | ({"output": group[1]} if group[1] else {})
        rows.append({**where, "images": sum(r["images"] for r in part),
                     "references": sum(r["references"] for r in part),
                     **{k: sum(r[k] for r in part) / len(part) for k in ("clip_t", "clip_t_cosine", "clip_i", "dino_i")}})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    write_atomic(args.out / "metrics.csv", buffer.getvalue())
    info = {"clip_model": str(args.clip_model), "dino_model": str(args.dino_model), "preprocessing": args.preprocessing,
            "clip_t_weight": args.clip_t_weight, "device": device}
    write_atomic(args.out / "metrics.json", json.dumps({**info, "rows": rows, "images": images}, indent=1))
    print(f"[metrics] wrote {args.out / 'metrics.csv'} and metrics.json")


# -- main ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="URL of a running ComfyUI, e.g. http://127.0.0.1:8188")
    parser.add_argument("--workflow", required=True, type=Path, help="an API-format workflow with param: titles")
    parser.add_argument("--checkpoint", help="checkpoint file name as the server lists it (param:checkpoint)")
    parser.add_argument("--subjects", required=True, type=Path, help="folder of subject photo folders")
    parser.add_argument("--subset", nargs="+", help="subject names (default: every sub-folder)")
    parser.add_argument("--classes", type=Path, help="subject_name,class file (default: SUBJECTS/prompts_and_classes.txt)")
    parser.add_argument("--prompts", required=True, nargs="+", type=Path, help="prompt list file(s); {} = subject")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="one job per seed (param:seed)")
    parser.add_argument("--steps", type=int, help="sampling steps (param:steps)")
    parser.add_argument("--size", type=int, help="image width and height (param:size)")
    parser.add_argument("--concept", default="{subject}.safetensors", help="concept file name pattern (param:concept)")
    parser.add_argument("--token", default="<{subject}>", help="concept token pattern (param:token)")
    parser.add_argument("--name", default="{subject}", help="trained concept name pattern (param:name)")
    parser.add_argument("--train-steps", type=int, help="FDTE Trainer steps (param:train_steps)")
    parser.add_argument("--reference-index", type=int, default=0, help="which sorted photo is the reference")
    parser.add_argument("--out", required=True, type=Path, help="run folder (images, manifest, metrics)")
    parser.add_argument("--max-jobs", type=int, help="stop after this many new jobs (resume later)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one job may take")
    parser.add_argument("--clip-model", type=Path, help="local Hugging Face CLIP folder (e.g. clip-vit-base-patch32)")
    parser.add_argument("--dino-model", type=Path, help="local Hugging Face DINO folder (e.g. dino-vits16)")
    parser.add_argument("--preprocessing", choices=("custom_diffusion", "model_folder"), default="custom_diffusion")
    parser.add_argument("--clip-t-weight", type=float, default=2.5, help="w in CLIP-T = w * max(cos, 0)")
    parser.add_argument("--metrics-device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--no-metrics", action="store_true", help="only generate")
    return parser.parse_args(argv)


def check_args(args) -> tuple[list[str], dict[str, str]]:
    if not args.subjects.is_dir():
        raise RunnerError(f"--subjects: {args.subjects} is not a folder")
    subjects = args.subset or sorted(p.name for p in args.subjects.iterdir() if p.is_dir() and subject_photos(p))
    for subject in subjects:
        folder = args.subjects / subject
        if not folder.is_dir() or not subject_photos(folder):
            raise RunnerError(f"--subset: {folder} is not a folder of photos")
        if args.reference_index >= len(subject_photos(folder)):
            raise RunnerError(f"--reference-index {args.reference_index}: {subject} has {len(subject_photos(folder))} photos")
    classes_path = args.classes or args.subjects / "prompts_and_classes.txt"
    if not classes_path.is_file():
        raise RunnerError(f"{classes_path} does not exist; give --classes with 'subject_name,class' lines")
    classes = read_classes(classes_path)
    unknown = [s for s in subjects if s not in classes]
    if unknown:
        raise RunnerError(f"{classes_path} has no class word for {', '.join(unknown)}")
    for path in args.prompts:
        if not path.is_file() or not read_prompts(path):
            raise RunnerError(f"--prompts: {path} is not a file of prompts")
    if not args.no_metrics:
        if args.clip_model is None or args.dino_model is None:
            raise RunnerError("give --clip-model and --dino-model (local model folders) or --no-metrics")
        metrics = load_metrics_module()
        try:
            metrics.check_model_folder(str(args.clip_model), "clip", args.preprocessing)
            metrics.check_model_folder(str(args.dino_model), "dino", args.preprocessing)
        except metrics.MetricModelError as err:
            raise RunnerError(str(err)) from None
    return subjects, classes


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        subjects, classes = check_args(args)
        workflow = json.loads(args.workflow.read_text())
        params = find_params(workflow)
        given = {"checkpoint": args.checkpoint, "steps": args.steps, "size": args.size,
                 "train_steps": args.train_steps}
        unused = [name for name, value in given.items() if value is not None and name not in params]
        if unused:
            raise RunnerError(f"the workflow has no node titled param:{unused[0]}, so --{unused[0].replace('_', '-')} "
                              "cannot be applied")
        if uses_prompt_list(workflow, params):
            for path in args.prompts:
                bad = [line for line in read_prompts(path) if "{}" not in line]
                if bad:
                    raise RunnerError(f"--prompts: {path} has a line without {{}} ('{bad[0]}'); the Prompt List needs "
                                      "{} where the subject goes in every line")
        jobs = plan_jobs(subjects, classes, args.prompts, args.seeds, args.token, uses_prompt_list(workflow, params))
        settings = {"workflow": hashlib.sha256(json.dumps(workflow, sort_keys=True).encode()).hexdigest(),
                    "checkpoint": args.checkpoint, "steps": args.steps, "size": args.size, "concept": args.concept,
                    "token": args.token, "reference_index": args.reference_index}
        if "name" in params:
            settings["name"] = args.name
        if args.train_steps is not None:
            settings["train_steps"] = args.train_steps
        manifest = load_manifest(args.out / "manifest.json", settings)
    except RunnerError as err:
        print(f"[run_figure] {err}", file=sys.stderr)
        return 2
    server = Server(args.server, args.timeout)
    counts = run_jobs(args, server, workflow, params, jobs, manifest)
    print(f"[run_figure] {counts['done']} done, {counts['skipped']} already done, {counts['failed']} failed, "
          f"{counts['left']} left (of {len(jobs)})")
    if counts["failed"]:
        print("[run_figure] run again to retry the failed jobs", file=sys.stderr)
        return 1
    if counts["left"]:
        print("[run_figure] stopped at --max-jobs; run again to continue")
        return 0
    if not args.no_metrics:
        compute_metrics(args, jobs, manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
