"""CLIP-T, CLIP-I and DINO-I of a finished run, with eqdiff_core.metrics (the protocol of the paper's
Table 1; torch and transformers from this process), from local model folders: per subject, prompt set
(and output, when the workflow saves several variants) the subject's images against all its photos, then
the mean over subjects. ``OUT/metrics.csv`` has one row per group, ``OUT/metrics.json`` the same plus
every image's scores and the key of what was measured: a re-run over the same images and settings
reads it back instead of measuring again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from eqdiff_core.files import write_atomic

from .plan import subject_photos

SCORES = ("clip_t", "clip_t_cosine", "clip_i", "dino_i")


def read_image(path: Path):
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)


def image_entries(record: dict) -> list[tuple[str, str, str]]:
    """(prompt, file, output label) of each image of a finished sampling job."""
    n = len(record["files"])
    return list(zip(record["file_prompts"], record["files"], record.get("file_outputs") or [""] * n))


def measured_key(out: Path, records: list[dict], info: dict) -> str:
    """What the numbers depend on: every image (its prompt, name and content) and the metric settings."""
    digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode())
    for record in records:
        for prompt, file, _ in image_entries(record):
            digest.update(f"{prompt}\n{file}\n".encode())
            digest.update(hashlib.sha256((out / file).read_bytes()).digest())
    return digest.hexdigest()


def compute(out: Path, subjects_dir: Path, records: list[dict], settings: dict) -> tuple[list[dict], bool]:
    """The rows (one per subject x prompt set [x output], then the means) and whether they were measured
    now (written to metrics.csv and metrics.json) or read back from metrics.json, which measured these
    very images with these settings."""
    from eqdiff_core import metrics as core

    info = {k: settings[k] for k in ("clip_model", "dino_model", "preprocessing", "clip_t_weight")}
    key = measured_key(out, records, info)
    saved = out / "metrics.json"
    if saved.exists():
        previous = json.loads(saved.read_text())
        if previous.get("key") == key:
            print("[metrics] up to date (metrics.json measured these images with these settings)")
            return previous["rows"], False
    import torch

    device = settings["device"] if settings["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    clip = core.ClipEncoder.load(settings["clip_model"], settings["preprocessing"])
    dino = core.DinoEncoder.load(settings["dino_model"], settings["preprocessing"])
    clip.model.to(device)
    dino.model.to(device)
    rows, images = [], []
    outputs = list(dict.fromkeys(o for r in records for _, _, o in image_entries(r)))
    for subject in dict.fromkeys(r["subject"] for r in records):
        references = [read_image(p) for p in subject_photos(subjects_dir / subject)]
        for prompt_set in dict.fromkeys(r["prompt_set"] for r in records):
            chosen = [r for r in records if r["subject"] == subject and r["prompt_set"] == prompt_set]
            for output in outputs:
                files = [(p, f) for r in chosen for p, f, o in image_entries(r) if o == output]
                if not files:
                    continue
                result = core.evaluate(clip, dino, [read_image(out / f) for _, f in files], references,
                                       [p for p, _ in files], [chosen[0]["token"]], settings["clip_t_weight"])
                where = {"subject": subject, "prompt_set": prompt_set} | ({"output": output} if output else {})
                rows.append({**where, "images": len(files), "references": len(references), **result.summary()})
                images += [{**where, "file": f, **row} for (_, f), row in zip(files, result.rows()[:-1])]
                print(f"[metrics] {' / '.join(where.values())}: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in result.summary().items()), flush=True)
    for group in dict.fromkeys((r["prompt_set"], r.get("output")) for r in rows):
        part = [r for r in rows if (r["prompt_set"], r.get("output")) == group]
        where = {"subject": "mean", "prompt_set": group[0]} | ({"output": group[1]} if group[1] else {})
        rows.append({**where, "images": sum(r["images"] for r in part), "references": sum(r["references"] for r in part),
                     **{k: sum(r[k] for r in part) / len(part) for k in SCORES}})
    write_atomic(out / "metrics.csv", core.rows_to_csv(rows))
    write_atomic(saved, json.dumps({**info, "device": device, "key": key, "rows": rows, "images": images}, indent=1))
    print(f"[metrics] wrote {out / 'metrics.csv'} and metrics.json", flush=True)
    return rows, True
