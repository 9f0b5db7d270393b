"""Puts the environment's real ComfyUI on sys.path, set up for library use (tests only)."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = Path(os.environ.get("EQDIFF_ENV", REPO / ".comfy"))
COMFY_DIR = ENV / "ComfyUI"
PACK_DIR = COMFY_DIR / "custom_nodes" / "eqdiff-nodes"
TINY_CHECKPOINT = COMFY_DIR / "models" / "checkpoints" / "eqdiff_tiny_sd15.safetensors"


def use_comfy() -> None:
    """Import ComfyUI as a library: argument parsing off, CPU unless a GPU is present.

    ``args.cpu`` must be set before ``comfy.model_management`` is first imported.
    """
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    import torch
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
