"""Model folders and ComfyUI's input / output / temp directories (``folder_paths``).

The pack's folders are registered *beside* any paths the user configured in extra_model_paths.yaml,
never replacing them: ``models/eqdiff`` (concept files), ``models/eqdiff_class_images`` (generated
class images, for prior preservation), ``models/eqdiff_metrics`` (metric model folders), ``models/grounding-dino`` and ``models/sams`` (the folder names of the common Grounded-SAM
packs, so files users already have are found).
"""

from __future__ import annotations

import os

import folder_paths

CONCEPTS = "eqdiff"
CLASS_IMAGES = "eqdiff_class_images"
METRICS = "eqdiff_metrics"
GROUNDING_DINO = "grounding-dino"
SAM = "sams"
EMBEDDINGS = "embeddings"


def register() -> None:
    _add(CONCEPTS, {".safetensors"}, replace_extensions=True)
    _add(CLASS_IMAGES, set())
    _add(METRICS, set())
    for name in (GROUNDING_DINO, SAM):
        _add(name, {".pth", ".safetensors"})


def _add(name: str, extensions: set, replace_extensions: bool = False) -> None:
    folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
    paths, existing = folder_paths.folder_names_and_paths[name]
    if extensions:
        folder_paths.folder_names_and_paths[name] = (paths, extensions if replace_extensions else set(existing) | extensions)


def paths(folder: str) -> list[str]:
    """Every configured path of a model folder; [] for a folder nobody registered."""
    if folder not in folder_paths.folder_names_and_paths:
        return []
    return folder_paths.get_folder_paths(folder)


def default_path(folder: str) -> str:
    """Where the pack writes into a model folder: its first configured path, else models/<folder>."""
    found = paths(folder)
    return found[0] if found else os.path.join(folder_paths.models_dir, folder)


def files(folder: str) -> list[str]:
    """File names (relative to the folder) with the folder's extensions, as model combos list them."""
    return folder_paths.get_filename_list(folder)


def full_path(folder: str, name: str) -> str | None:
    return folder_paths.get_full_path(folder, name)


def models_dir() -> str:
    return folder_paths.models_dir


def input_directory() -> str:
    return folder_paths.get_input_directory()


def temp_directory() -> str:
    return folder_paths.get_temp_directory()


def output_file_stem(prefix: str) -> tuple[str, str]:
    """(folder, ``<name>_<counter>_``) for a new output file of ``prefix`` (a path inside the output
    directory), numbered like Save Image's files."""
    folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, folder_paths.get_output_directory())
    return folder, f"{name}_{counter:05}_"
