"""A job as a request to a worker (the filled workflow, the files to upload first, what to collect) and
the worker's answer as files under OUT (written atomically) and a manifest record.

Files reach the workers through Ray's object store, never a shared filesystem: each photo, mask and
concept is put there once by the driver and uploaded by a worker through its server's /upload/image the
first time one of its jobs needs it. Concepts live in each server's input/eqdiff_concepts/, which the
worker registers as a concept folder, so Load Concept finds an uploaded concept and Save Concept writes
the trained one there (downloaded back through /view).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import ray

from eqdiff_core.files import write_atomic

from . import params as P
from .plan import subject_masks, subject_photos
from .worker import CONCEPT_FOLDER, JobFailed

UPLOAD_FOLDER = "eqdiff_runner"


@dataclass
class Workflow:
    """A workflow file with its parameters (``role`` names the option it came from, for errors)."""

    path: Path
    nodes: dict
    params: dict[str, list[str]]

    @classmethod
    def read(cls, path: Path, required: tuple[str, ...], role: str) -> "Workflow":
        try:
            nodes = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise P.RunnerError(f"{role}: {path} is not a readable API-format workflow JSON file ({err})") from None
        return cls(path, nodes, P.find_params(nodes, required, role))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.nodes, sort_keys=True).encode()).hexdigest()


class Inputs:
    """The files jobs upload, each put into the object store once: subject photos and masks, concepts."""

    def __init__(self, store=ray.put):
        self.store = store  # Ray's object store; a test of the requests alone can keep the bytes as they are
        self.refs: dict[str, dict] = {}

    def put(self, key: str, data: bytes, dest: str, name: str) -> dict:
        if key not in self.refs:
            self.refs[key] = {"subfolder": dest, "name": name, "digest": hashlib.sha256(data).hexdigest(),
                              "data": self.store(data)}
        return self.refs[key]

    def file(self, path: Path, dest: str) -> dict:
        return self.put(str(path), path.read_bytes(), dest, path.name)

    def concept(self, subject: str, data: bytes, name: str) -> dict:
        return self.put(f"concept:{subject}", data, CONCEPT_FOLDER, name)

    def concept_entry(self, subject: str) -> dict | None:
        """The subject's concept as an upload, once it has been put."""
        return self.refs.get(f"concept:{subject}")

    def drop_concept(self, subject: str) -> None:
        """Once a subject's jobs are all done its concept can leave the object store."""
        self.refs.pop(f"concept:{subject}", None)


@dataclass
class RequestMaker:
    """The run's values that go into every request."""

    out: Path
    subjects_dir: Path
    sample: Workflow
    train: Workflow | None
    values: dict  # checkpoint, steps, size, train_steps, train_size, train_precision, class_images: those given
    concept_pattern: str
    name_pattern: str
    reference_index: int
    timeout: float

    def subject_uploads(self, inputs: Inputs, subject: str) -> list[dict]:
        folder = self.subjects_dir / subject
        dest = f"{UPLOAD_FOLDER}/{subject}"
        return ([inputs.file(p, dest) for p in subject_photos(folder)]
                + [inputs.file(p, f"{dest}/masks") for p in subject_masks(folder)])

    def request(self, job: dict, inputs: Inputs) -> dict:
        subject = job["subject"]
        if job["kind"] == "train":
            return self._train_request(job, inputs)
        workflow = self.sample
        uploads = []
        values = {"prompt": job["prompt"], "seed": job["seed"], "token": job["token"], "class_word": job["class_word"],
                  "concept": self.concept_pattern.format(subject=subject),
                  "name": self.name_pattern.format(subject=subject),
                  "output": f"{UPLOAD_FOLDER}/{job['id'].replace('/', '_')}", **self.values}
        if "reference" in workflow.params:
            photo = subject_photos(self.subjects_dir / subject)[self.reference_index]
            uploads.append(inputs.file(photo, f"{UPLOAD_FOLDER}/{subject}"))
            values["reference"] = f"{UPLOAD_FOLDER}/{subject}/{photo.name}"
        if "subject" in workflow.params:
            uploads += self.subject_uploads(inputs, subject)
            values["subject"] = f"{UPLOAD_FOLDER}/{subject}"
        if inputs.concept_entry(subject):
            uploads.append(inputs.concept_entry(subject))
        filled = P.fill(workflow.nodes, workflow.params, values)
        if job["index"] is None:
            P.fill_prompt_list(filled, workflow.params, job["lines"], job["phrase"])
        return {"job": job["id"], "prompt": P.needed_by(filled, workflow.params["output"]), "uploads": uploads,
                "collect": workflow.params["output"], "concept": None, "timeout": self.timeout}

    def _train_request(self, job: dict, inputs: Inputs) -> dict:
        subject, workflow = job["subject"], self.train
        name = self.name_pattern.format(subject=subject)
        values = {"subject": f"{UPLOAD_FOLDER}/{subject}", "class_word": job["class_word"], "name": name,
                  "token": job["token"], **self.values}
        filled = P.fill(workflow.nodes, workflow.params, values)
        savers = P.concept_savers(filled, workflow.params)
        for node_id in savers:
            filled[node_id]["inputs"]["overwrite"] = True  # a retry on the same server replaces its earlier file
        return {"job": job["id"], "prompt": P.needed_by(filled, savers), "uploads": self.subject_uploads(inputs, subject),
                "collect": [], "concept": f"{name}.safetensors", "timeout": self.timeout}

    def store(self, job: dict, result: dict) -> dict:
        """The result's files written under OUT; the job's manifest record."""
        record = {**job, "status": "done", "prompt_id": result["prompt_id"], "seconds": result["seconds"],
                  "worker": result["worker"]}
        if job["kind"] == "train":
            rel = Path("concepts") / self.concept_pattern.format(subject=job["subject"])
            write_atomic(self.out / rel, result["concept"])
            return {**record, "files": [rel.as_posix()], "sha256": hashlib.sha256(result["concept"]).hexdigest()}
        saved = result["images"]
        empty = [node_id for node_id, images in saved.items() if not images]
        if empty:
            raise JobFailed(f"--workflow node {empty[0]} (param:output) saved no image; it must be a Save Image")
        files, file_prompts, file_outputs = [], [], []
        for node_id, images in saved.items():
            # several param:output nodes (variants of a figure): their label goes into the names
            label = P.output_names(self.sample.nodes, self.sample.params)[node_id] if len(saved) > 1 else ""
            part = f"_{label}" if label else ""
            if job["index"] is None:
                if len(images) % len(job["prompts"]):
                    raise JobFailed(f"--workflow node {node_id} saved {len(images)} images for {len(job['prompts'])} "
                                    "prompts; it must save the same number for every prompt")
                per = len(images) // len(job["prompts"])
                names = [f"{i // per:03d}_s{job['seed']}{part}_{i % per}.png" for i in range(len(images))]
                file_prompts += [job["prompts"][i // per] for i in range(len(images))]
            else:
                names = [f"{job['index']:03d}_s{job['seed']}{part}_{k}.png" for k in range(len(images))]
                file_prompts += [job["prompt"]] * len(images)
            file_outputs += [label] * len(images)
            for name, data in zip(names, images):
                rel = Path("images") / job["subject"] / job["prompt_set"] / name
                write_atomic(self.out / rel, data)
                files.append(rel.as_posix())
        record |= {"files": files, "file_prompts": file_prompts}
        if len(saved) > 1:
            record["file_outputs"] = file_outputs
        return record
