"""The main job: start ComfyUI headless with this pack, run the EqDiff quickstart workflow (subject
photos -> Grounded Mask -> FDTE Trainer -> Apply Concept -> RRA Patch -> Equilibrated Sampler -> Save)
on the shipped backpack_dog photos, and print where its outputs are.

    python scripts/quickstart.py [--checkpoint SD15.safetensors [--grounding-dino F --sam F --bert DIR]]

Without --checkpoint everything runs on the built-in tiny models (random weights, made by
setup_env.sh) at a small size and few steps: a check that the whole pipeline works, in about a minute
on a CPU. With a real checkpoint the workflow runs as shipped (512 px, 600 training steps, 50
sampling steps). Grounded Mask then needs real GroundingDINO + SAM files (and the BERT folder); without
them the trainer takes the hand-drawn masks shipped with the photos.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from comfy_server import REPO, ComfyServer, PromptFailed, PromptRejected

QUICKSTART_WORKFLOW = REPO / "workflows" / "api" / "eqdiff_quickstart.json"
ASSETS = REPO / "workflows" / "assets"
TINY_CHECKPOINT = "eqdiff_tiny_sd15.safetensors"


def copy_sample_assets(input_dir: Path) -> None:
    """The shipped sample photos into ComfyUI's input folder as the workflows name them: the top-level
    photo and mask (core's Load Image lists only the top of input/) and the subject folder backpack_dog/."""
    for asset in [*ASSETS.glob("*.jpg"), *ASSETS.glob("*.png")]:
        shutil.copy(asset, input_dir / asset.name)
    shutil.copytree(ASSETS / "backpack_dog", input_dir / "backpack_dog", dirs_exist_ok=True)


def use_checkpoint(prompt: dict, ckpt_name: str) -> dict:
    """Point every checkpoint loader of an API-format prompt at ``ckpt_name``."""
    for node in prompt.values():
        if node.get("class_type") == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = ckpt_name
    return prompt


def nodes_of(prompt: dict, class_type: str) -> list[dict]:
    return [n for n in prompt.values() if n.get("class_type") == class_type]


def tiny_sized(prompt: dict, gpu: bool) -> dict:
    """The quickstart at the size the built-in tiny models are meant for."""
    sizes = {"EqDiffLoadSubject": {"size": 128}, "EqDiffTrainerOptions": {"resolution": 128},
             "EqDiffFDTETrainer": {"steps": 20, "batch_size": 1, "precision": "bf16" if gpu else "fp32"},
             "EmptyLatentImage": {"width": 128, "height": 128}, "EqDiffEquilibratedSampler": {"steps": 20},
             "EqDiffClassImages": {"count": 8, "size": 128, "steps": 20},
             "EqDiffGroundingLoader": {"grounding_dino": "eqdiff_tiny_swint.safetensors",
                                       "sam": "eqdiff_tiny_vit.safetensors"},
             # random detector weights: take the best box whatever its score
             "EqDiffGroundedMask": {"box_threshold": 0.0, "text_threshold": 0.0, "boxes": "best", "detect_size": 256},
             "EqDiffSaveConcept": {"overwrite": True}}
    for class_type, values in sizes.items():
        for node in nodes_of(prompt, class_type):
            node["inputs"].update(values)
    return prompt


def use_shipped_masks(prompt: dict) -> dict:
    """Without grounding weights: the trainer takes the masks of Load Subject Photos (masks/*.png)."""
    ids = {n["class_type"]: k for k, n in prompt.items()}
    subject = ids["EqDiffLoadSubject"]
    for node in nodes_of(prompt, "EqDiffFDTETrainer"):
        node["inputs"]["masks"] = [subject, 1]
    grounding = {k for k, n in prompt.items() if n["class_type"] in ("EqDiffGroundingLoader", "EqDiffGroundedMask")}
    for key in list(prompt):
        inputs = prompt[key]["inputs"].values()
        if key in grounding or any(isinstance(v, list) and v and v[0] in grounding for v in inputs):
            del prompt[key]
    return prompt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="an SD1.x checkpoint (.safetensors or .ckpt)")
    parser.add_argument("--workflow", type=Path, default=QUICKSTART_WORKFLOW, help="API-format workflow")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "quickstart", help="run folder")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--grounding-dino", type=Path, help="GroundingDINO .pth/.safetensors (with --checkpoint)")
    parser.add_argument("--sam", type=Path, help="SAM .pth/.safetensors (with --checkpoint)")
    parser.add_argument("--bert", type=Path, help="the bert-base-uncased folder GroundingDINO reads")
    args = parser.parse_args()

    extra_paths = []
    ckpt_name = TINY_CHECKPOINT
    if args.checkpoint is not None:
        ckpt = args.checkpoint.expanduser().resolve()
        if not ckpt.is_file() or ckpt.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
            print(f"--checkpoint: {ckpt} is not a checkpoint file (.safetensors or .ckpt)", file=sys.stderr)
            return 2
        folders = {"checkpoints": ckpt.parent}
        if args.grounding_dino and args.sam:
            folders |= {"grounding-dino": args.grounding_dino.resolve().parent, "sams": args.sam.resolve().parent}
            if args.bert:
                folders["bert-base-uncased"] = args.bert.resolve()
        yaml_path = Path(tempfile.mkdtemp()) / "extra_model_paths.yaml"
        yaml_path.write_text("eqdiff_quickstart:\n" + "".join(f"    {k}: {json.dumps(str(v))}\n" for k, v in folders.items()))
        extra_paths.append(yaml_path)
        ckpt_name = ckpt.name

    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    prompt = use_checkpoint(json.loads(args.workflow.read_text()), ckpt_name)
    if args.checkpoint is None:
        prompt = tiny_sized(prompt, gpu)
    elif args.grounding_dino and args.sam:
        for node in nodes_of(prompt, "EqDiffGroundingLoader"):
            node["inputs"].update(grounding_dino=args.grounding_dino.name, sam=args.sam.name)
    elif nodes_of(prompt, "EqDiffGroundedMask"):
        print("[quickstart] no --grounding-dino/--sam given: the trainer uses the masks shipped with the photos")
        prompt = use_shipped_masks(prompt)
    if not any(n.get("class_type") == "CheckpointLoaderSimple" for n in prompt.values()):
        print(f"[quickstart] {args.workflow.name} loads no checkpoint; {ckpt_name} is used by workflows that do")
    server = ComfyServer(args.out, cpu=not gpu, extra_model_paths=extra_paths)
    print(f"[quickstart] starting ComfyUI ({'GPU' if gpu else 'CPU'}) at {server.url}, log: {server.log_path}")
    with server:
        copy_sample_assets(server.input_dir)
        started = time.monotonic()
        try:
            entry = server.run(prompt)
        except PromptRejected as err:
            print(f"[quickstart] the server rejected the workflow:\n{err}", file=sys.stderr)
            return 1
        except PromptFailed as err:
            print(f"[quickstart] the workflow failed:\n{err}", file=sys.stderr)
            return 1
        files = server.output_files(entry)
    print(f"[quickstart] {args.workflow.name} ran in {time.monotonic() - started:.1f} s; outputs:")
    for path in files:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
