"""Load Subject Photos: every photo of a folder in ComfyUI's input directory as one batch, with masks."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from .comfyui import folders
from .comfyui.node_api import io

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def subject_folders() -> list[str]:
    """Sub-folders of the input directory that hold at least one photo."""
    root = folders.input_directory()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "masks")
        if dirpath != root and any(_is_photo(f) for f in filenames):
            found.append(os.path.relpath(dirpath, root).replace(os.sep, "/"))
    return sorted(found)


def _is_photo(name: str) -> bool:
    stem, ext = os.path.splitext(name)
    return ext.lower() in PHOTO_EXTENSIONS and not stem.endswith("_mask") and not name.startswith(".")


def _square(path: str, size: int, mode: str) -> np.ndarray:
    """The centre square of an image, resized to size x size, as floats in [0, 1]."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert(mode)
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.float32) / 255.0


def _mask_file(folder: str, stem: str) -> str | None:
    for candidate in (os.path.join(folder, "masks", stem + ".png"), os.path.join(folder, stem + "_mask.png")):
        if os.path.isfile(candidate):
            return candidate
    return None


class EqDiffLoadSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffLoadSubject",
            display_name="Load Subject Photos",
            category="EqDiff/training",
            description="Loads every photo of a folder in ComfyUI's input directory (e.g. input/backpack_dog/) as "
            "one batch, each cropped to its centre square. Masks are read from masks/<photo>.png or "
            "<photo>_mask.png (white = subject) when present; without them connect Grounded Mask instead.",
            inputs=[
                io.Combo.Input("folder", options=subject_folders(),
                               tooltip="A sub-folder of ComfyUI's input directory holding 3-6 photos of the subject."),
                io.Int.Input("size", default=512, min=64, max=2048, step=64,
                             tooltip="Side of the square photos (the trainer's resolution)."),
            ],
            outputs=[
                io.Image.Output("images", display_name="images", tooltip="The photos, sorted by file name."),
                io.Mask.Output("masks", display_name="masks",
                               tooltip="Their masks from the mask files; all ones (whole photo) where a file is missing."),
                io.Int.Output("count", display_name="count", tooltip="How many photos."),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder) -> bool | str:
        if folder is not None and not os.path.isdir(cls._path(folder)):
            return (f"folder: '{folder}' is not a folder in {folders.input_directory()}; put the subject's "
                    f"photos in a sub-folder there and refresh")
        return True

    @staticmethod
    def _path(folder: str) -> str:
        root = os.path.abspath(folders.input_directory())
        path = os.path.abspath(os.path.join(root, folder))
        return path if os.path.commonpath([root, path]) == root else os.path.join(root, "\0invalid")

    @classmethod
    def fingerprint_inputs(cls, folder, size):
        path = cls._path(folder)
        if not os.path.isdir(path):
            return None
        return tuple((n, os.path.getmtime(os.path.join(dp, n))) for dp, _, names in sorted(os.walk(path))
                     for n in sorted(names))

    @classmethod
    def execute(cls, folder, size) -> io.NodeOutput:
        path = cls._path(folder)
        names = sorted(n for n in os.listdir(path) if _is_photo(n) and os.path.isfile(os.path.join(path, n)))
        if not names:
            raise ValueError(f"folder: '{folder}' holds no photos ({', '.join(PHOTO_EXTENSIONS)})")
        images, masks, missing = [], [], []
        for name in names:
            images.append(_square(os.path.join(path, name), size, "RGB"))
            mask_path = _mask_file(path, os.path.splitext(name)[0])
            if mask_path is None:
                missing.append(name)
                masks.append(np.ones((size, size), dtype=np.float32))
            else:
                masks.append(_square(mask_path, size, "L"))
        if missing:
            logging.warning("Load Subject Photos: no mask for %s in %s; they count as whole-photo masks",
                            ", ".join(missing), folder)
        return io.NodeOutput(torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)), len(names))


NODES = [EqDiffLoadSubject]
