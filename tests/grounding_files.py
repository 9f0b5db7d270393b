"""Small GroundingDINO and SAM checkpoints in the original repositories' formats, written once by
tests/grounding_factory.py (the original libraries, random weights) and kept in the temp folder under a
key of the factory's own bytes, so every test session, the transformers 5.x run and each mutant of a
mutation run read the same files instead of building them again (about 20 s)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

FACTORY = Path(__file__).resolve().parent / "grounding_factory.py"
BERT_FOLDER = "bert-base-uncased"  # eqdiff_core.grounding.BERT_FOLDER, where the loader looks for it


def factory_files() -> Path:
    """The factory's folder (with ``--shapes``), its BERT folder moved into grounding-dino/ as a user keeps it."""
    key = hashlib.sha256(FACTORY.read_bytes()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"eqdiff-grounding-{key}"
    if (out / "complete").is_file():
        return out
    work = Path(tempfile.mkdtemp(prefix="eqdiff-grounding-build-"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the 4.x venv, never an overlay
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, str(FACTORY), str(work), "--shapes"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    shutil.move(str(work / "bert"), str(work / "grounding-dino" / BERT_FOLDER))
    (work / "complete").write_text("")
    try:
        work.rename(out)  # atomic: another session that got there first keeps its copy
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
    return out


def released_shapes() -> dict:
    """Key -> shape of the released backbones and SAMs (the factory's shapes.json, from the original code)."""
    return json.loads((factory_files() / "shapes.json").read_text())


def meta_state(shapes: dict) -> dict:
    """A state dict of meta tensors (no memory) of the given shapes."""
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def assert_matches_reference(core, dino, sam, ref: dict) -> None:
    """Same weights, same inputs: transformers' models under the pack's key mapping reproduce the
    original groundingdino-py and segment-anything outputs stored in the factory's reference.pt."""
    ids, _ = core.tokenize_phrases(dino.tokenizer, core.parse_phrases(ref["caption"]))
    assert ids[0].tolist() == ref["input_ids"].tolist()
    probs, boxes = core.dino_forward(dino, ref["pixels"], ids)
    t = ids.shape[1]
    assert (probs.cpu() - ref["dino_probs"][..., :t]).abs().max() < 1e-3
    assert (boxes.cpu() - ref["dino_boxes"]).abs().max() < 1e-3
    emb = core.sam_embeddings(sam, ref["sam_pixels"]).float().cpu()
    assert (emb - ref["sam_embeddings"]).abs().max() < 2e-3 * max(1.0, ref["sam_embeddings"].abs().max().item())
    low, iou = core.sam_decode(sam, emb, ref["sam_boxes"])
    assert (low.cpu() - ref["sam_low_res"][:, 0]).abs().max() < 2e-2 * max(1.0, ref["sam_low_res"].abs().max().item())
    assert ((low.cpu() > 0) != (ref["sam_low_res"][:, 0] > 0)).float().mean() < 0.01
    assert (iou.cpu() - ref["sam_iou"][:, 0]).abs().max() < 2e-2


def reference(files: Path) -> dict:
    return torch.load(files / "reference.pt", weights_only=True)
