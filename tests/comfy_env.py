"""Puts the environment's real ComfyUI on sys.path, set up for library use (tests only)."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = Path(os.environ.get("EQDIFF_ENV", REPO / ".comfy"))
COMFY_DIR = ENV / "ComfyUI"
# An environment for another ComfyUI tree (scripts/tree_env.sh) keeps models and custom_nodes in its own
# base/ folder, ComfyUI's --base-directory, and writes nothing into the tree; the default environment
# keeps them in its own ComfyUI folder.
BASE_DIR = ENV / "base" if (ENV / "base").is_dir() else None
PACK_DIR = (BASE_DIR or COMFY_DIR) / "custom_nodes" / "eqdiff-nodes"
TINY_CHECKPOINT = (BASE_DIR or COMFY_DIR) / "models" / "checkpoints" / "eqdiff_tiny_sd15.safetensors"


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
    if BASE_DIR is not None:
        comfy.cli_args.args.base_directory = str(BASE_DIR)  # read when folder_paths is first imported


def pack_package() -> str | None:
    """The module name ComfyUI's custom-node loader imported the pack under (0.3.75: the folder's path,
    dots replaced), or None before it is loaded. Found by file, since the name differs between releases;
    the name found is kept while that module stays loaded."""
    global _package
    if _package not in sys.modules:
        init = os.path.realpath(PACK_DIR / "__init__.py")
        found = [key for key, module in list(sys.modules.items())
                 if os.path.realpath(getattr(module, "__file__", None) or os.devnull) == init]
        assert len(found) <= 1, f"the pack is loaded more than once: {found}"
        _package = found[0] if found else None
    return _package


_package: str | None = None


def pack_module(name: str):
    """One of the pack's modules as ComfyUI imported it (``nodes.comfyui.training``, ``eqdiff_core.rra``);
    the pack must have been loaded (the ``registered_nodes`` fixture)."""
    module = sys.modules.get(f"{pack_package()}.{name}")
    assert module is not None, f"the pack's module {name} is not loaded (load the pack through registered_nodes)"
    return module
