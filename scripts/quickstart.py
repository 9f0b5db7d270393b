"""The main job: start ComfyUI headless with this pack, run the quickstart API workflow, print
where its outputs are.

    python scripts/quickstart.py [--checkpoint PATH_TO_SD15.safetensors] [--out DIR]

Without --checkpoint the built-in tiny checkpoint (random weights, made by setup_env.sh) is used.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from comfy_server import DEFAULT_ENV, REPO, ComfyServer, PromptFailed, PromptRejected

QUICKSTART_WORKFLOW = REPO / "workflows" / "api" / "fft_split.json"
ASSETS = REPO / "workflows" / "assets"
TINY_CHECKPOINT = "eqdiff_tiny_sd15.safetensors"


def use_checkpoint(prompt: dict, ckpt_name: str) -> dict:
    """Point every checkpoint loader of an API-format prompt at ``ckpt_name``."""
    for node in prompt.values():
        if node.get("class_type") == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = ckpt_name
    return prompt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="an SD1.x checkpoint (.safetensors or .ckpt)")
    parser.add_argument("--workflow", type=Path, default=QUICKSTART_WORKFLOW, help="API-format workflow")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts" / "quickstart", help="run folder")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    args = parser.parse_args()

    extra_paths = []
    ckpt_name = TINY_CHECKPOINT
    if args.checkpoint is not None:
        ckpt = args.checkpoint.expanduser().resolve()
        if not ckpt.is_file() or ckpt.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
            print(f"--checkpoint: {ckpt} is not a checkpoint file (.safetensors or .ckpt)", file=sys.stderr)
            return 2
        yaml_path = Path(tempfile.mkdtemp()) / "extra_model_paths.yaml"
        yaml_path.write_text(f"eqdiff_quickstart:\n    checkpoints: {json.dumps(str(ckpt.parent))}\n")
        extra_paths.append(yaml_path)
        ckpt_name = ckpt.name

    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    prompt = use_checkpoint(json.loads(args.workflow.read_text()), ckpt_name)
    if not any(n.get("class_type") == "CheckpointLoaderSimple" for n in prompt.values()):
        print(f"[quickstart] {args.workflow.name} loads no checkpoint; {ckpt_name} is used by workflows that do")
    server = ComfyServer(args.out, cpu=not gpu, extra_model_paths=extra_paths)
    print(f"[quickstart] starting ComfyUI ({'GPU' if gpu else 'CPU'}) at {server.url}, log: {server.log_path}")
    with server:
        for asset in ASSETS.glob("*.jpg"):
            shutil.copy(asset, server.input_dir / asset.name)
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
