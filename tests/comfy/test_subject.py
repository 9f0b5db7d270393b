"""Load Subject Photos in-process, on photos written here into a temporary input directory: the centre
square, EXIF orientation, the mask lookup, the order, and the guard against folders outside the input
directory. Expected pixels are computed here by hand with numpy from the written arrays."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture
def input_dir(registered_nodes, tmp_path):
    """ComfyUI's input directory pointed at a folder of this test, restored afterwards."""
    import folder_paths

    before = folder_paths.get_input_directory()
    root = tmp_path / "input"
    root.mkdir()
    folder_paths.set_input_directory(str(root))
    yield root
    folder_paths.set_input_directory(before)


def node(registered_nodes):
    return registered_nodes["EqDiffLoadSubject"]


def rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_centre_square_masks_and_order(registered_nodes, input_dir, caplog):
    folder = input_dir / "dog"
    (folder / "masks").mkdir(parents=True)
    wide, tall = rgb(64, 96, 1), rgb(80, 64, 2)   # (H, W): 96 wide, 80 tall
    Image.fromarray(wide).save(folder / "b.png")
    Image.fromarray(tall).save(folder / "a.png")
    Image.fromarray(rgb(64, 64, 3)).save(folder / "c.png")
    mask_a = np.zeros((80, 64), np.uint8)
    mask_a[10:30] = 255
    Image.fromarray(mask_a).save(folder / "masks" / "a.png")  # masks/<stem>.png ...
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(folder / "a_mask.png")  # ... before <stem>_mask.png
    mask_b = np.zeros((64, 96), np.uint8)
    mask_b[:, 40:50] = 255
    Image.fromarray(mask_b).save(folder / "b_mask.png")  # not a photo of its own
    with caplog.at_level(logging.WARNING):
        images, masks, count = node(registered_nodes).execute(folder="dog", size=64).result
    assert count == 3 and images.shape == (3, 64, 64, 3) and masks.shape == (3, 64, 64)
    # sorted by name; the centre square: rows (80 - 64) // 2 = 8 on of a.png, columns (96 - 64) // 2 = 16 on of b.png
    assert torch.equal(images[0], torch.from_numpy(tall[8:72].astype(np.float32) / 255))
    assert torch.equal(images[1], torch.from_numpy(wide[:, 16:80].astype(np.float32) / 255))
    assert torch.equal(masks[0], torch.from_numpy(mask_a[8:72].astype(np.float32) / 255))
    assert torch.equal(masks[1], torch.from_numpy(mask_b[:, 16:80].astype(np.float32) / 255))
    assert torch.equal(masks[2], torch.ones(64, 64))  # no mask file: the whole photo
    assert "c.png" in caplog.text and "a.png" not in caplog.text


def test_exif_orientation_is_applied(registered_nodes, input_dir):
    """EXIF orientation 6 (TIFF/EXIF spec): the stored pixels are shown rotated 90 degrees clockwise,
    so the stored top-left corner is shown at the top right."""
    folder = input_dir / "rotated"
    folder.mkdir()
    stored = np.zeros((64, 64, 3), np.uint8)
    stored[:8, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(folder / "p.jpg", exif=exif, quality=100)
    image = node(registered_nodes).execute(folder="rotated", size=64).result[0][0]
    assert float(image[:8, -8:].mean()) > 0.9 and float(image[:8, :8].mean()) < 0.1


def test_folders_outside_the_input_directory_are_refused(registered_nodes, input_dir):
    outside = input_dir.parent / "private"
    outside.mkdir()
    Image.fromarray(rgb(64, 64, 4)).save(outside / "secret.png")
    cls = node(registered_nodes)
    message = cls.validate_inputs(folder="../private")
    assert isinstance(message, str) and message.startswith("folder: '../private' is not a folder in")
    with pytest.raises(ValueError):  # never listed: the path is replaced by an invalid one
        cls.execute(folder="../private", size=64)
    (input_dir / "empty").mkdir()
    assert cls.validate_inputs(folder="empty") is True
    with pytest.raises(ValueError, match="folder: 'empty' holds no photos"):
        cls.execute(folder="empty", size=64)


def test_resizing_upper_case_names_the_folder_list_and_the_rerun_key(registered_nodes, input_dir):
    """A 128 px photo at size 64 is PIL's Lanczos resize of it (the expected value, made here with PIL); an
    upper-case extension is a photo; the folder list holds photo folders, not masks/ or the input directory
    itself; the key ComfyUI reruns the node on changes when a mask file changes."""
    from comfy_env import pack_module

    folder = input_dir / "cat"
    (folder / "masks").mkdir(parents=True)
    big = rgb(128, 128, 5)
    Image.fromarray(big).save(folder / "IMG_1.PNG")
    Image.fromarray(np.full((128, 128), 255, np.uint8)).save(folder / "masks" / "IMG_1.png")
    Image.fromarray(rgb(64, 64, 6)).save(input_dir / "loose.png")
    cls = node(registered_nodes)
    images, masks, count = cls.execute(folder="cat", size=64).result
    expected = np.asarray(Image.fromarray(big).resize((64, 64), Image.Resampling.LANCZOS), np.float32) / 255
    assert count == 1 and torch.equal(images[0], torch.from_numpy(expected)) and torch.equal(masks[0], torch.ones(64, 64))
    assert pack_module("nodes.subject").subject_folders() == ["cat"]
    key = cls.fingerprint_inputs(folder="cat", size=64)
    assert cls.fingerprint_inputs(folder="cat", size=64) == key
    os.utime(folder / "masks" / "IMG_1.png", (1, 1))
    assert cls.fingerprint_inputs(folder="cat", size=64) != key
    assert cls.fingerprint_inputs(folder="../elsewhere", size=64) is None
