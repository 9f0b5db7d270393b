"""The comparison sheet: every cell holds its column's image at the place the layout gives, by hand."""

import re

import numpy as np
import pytest
import torch

from eqdiff_core.comparison import LABEL_HEIGHT, PAD, comparison_grid


def solid(colour, count, size=8):
    return torch.tensor(colour, dtype=torch.float32).expand(count, size, size, 3).clone()


def cell(sheet, row, column, size=8, row_labels=False):
    """The (size, size, 3) cell at (row, column): x = PAD + column * (size + PAD),
    y = LABEL_HEIGHT + row * (size + PAD [+ LABEL_HEIGHT when rows are labelled])."""
    row_height = size + PAD + (LABEL_HEIGHT if row_labels else 0)
    x, y = PAD + column * (size + PAD), LABEL_HEIGHT + row * row_height
    return sheet[0, y:y + size, x:x + size]


def test_cells_hold_each_columns_images_in_order():
    red, blue = solid([1.0, 0.0, 0.0], 2), solid([0.0, 0.0, 1.0], 1)
    red[1] = torch.tensor([0.0, 1.0, 0.0])  # row 1 of column 0 is green
    sheet = comparison_grid([("a", red), ("b", blue)])
    assert sheet.shape == (1, LABEL_HEIGHT + 2 * (8 + PAD) + PAD, PAD + 2 * (8 + PAD), 3)
    assert torch.equal(cell(sheet, 0, 0), red[0]) and torch.equal(cell(sheet, 1, 0), red[1])
    assert torch.equal(cell(sheet, 0, 1), blue[0])
    assert torch.equal(cell(sheet, 1, 1), torch.ones(8, 8, 3))  # column b has one image: white below


def test_row_labels_make_room_under_each_row():
    sheet = comparison_grid([("a", solid([0.0, 0.0, 0.0], 2))], ["first prompt", "second prompt"])
    assert sheet.shape[1] == LABEL_HEIGHT + 2 * (8 + LABEL_HEIGHT + PAD) + PAD
    assert torch.equal(cell(sheet, 1, 0, row_labels=True), torch.zeros(8, 8, 3))
    label_strip = sheet[0, LABEL_HEIGHT + 8:LABEL_HEIGHT + 8 + LABEL_HEIGHT]
    assert (label_strip < 0.5).any()  # the text is drawn in black on white


def test_other_sizes_are_resized_to_the_first_column():
    sheet = comparison_grid([("a", solid([1.0, 1.0, 0.0], 1)), ("b", solid([0.0, 1.0, 1.0], 1, size=16))])
    assert torch.allclose(cell(sheet, 0, 1), torch.tensor([0.0, 1.0, 1.0]).expand(8, 8, 3))


def test_sheet_is_the_documented_layout_pixel_for_pixel():
    """Two columns of two 24 px images, rows labelled: cell (r, c) at x = PAD + c * 28, y = LABEL_HEIGHT + r * 48
    (24 + LABEL_HEIGHT + PAD per row); column labels at (x, 4), row labels at (PAD, y + 24 + 2), black, in
    PIL's default font; compared with the sheet drawn here."""
    from PIL import Image, ImageDraw

    colours = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255)]]  # column b has one image: white below
    columns = [(label, torch.stack([solid([v / 255 for v in rgb], 1, 24)[0] for rgb in images]))
               for label, images in zip("ab", colours)]
    want = Image.new("RGB", (PAD + 2 * 28, LABEL_HEIGHT + 2 * 48 + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(want)
    for c, (label, images) in enumerate(zip("ab", colours)):
        draw.text((PAD + c * 28, 4), label, fill=(0, 0, 0))
        for r, rgb in enumerate(images):
            draw.rectangle([PAD + c * 28, LABEL_HEIGHT + r * 48, PAD + c * 28 + 23, LABEL_HEIGHT + r * 48 + 23], fill=rgb)
    for r, text in enumerate(["p0", "p1"]):
        draw.text((PAD, LABEL_HEIGHT + r * 48 + 26), text, fill=(0, 0, 0))
    sheet = comparison_grid(columns, ["p0", "p1", "unused: no third row"])
    assert np.array_equal((sheet[0].numpy() * 255).round().astype(np.uint8), np.asarray(want))


def test_values_are_clipped_and_other_sizes_averaged_bilinearly():
    """Values outside [0, 1] show as black and white (an infinite pixel too, its neighbours untouched: an image of
    the first column's size is not interpolated); a 16 px one-pixel checkerboard shrunk to 8 px by bilinear
    interpolation (half-pixel centres: each output pixel is the mean of a 2 x 2 block) is 0.5 grey everywhere."""
    clipped = torch.tensor([-0.5, 1.5, 0.25]).expand(1, 8, 8, 3).clone()
    clipped[0, 3, 3] = float("inf")
    checker = ((torch.arange(16)[:, None] + torch.arange(16)) % 2).float()[None, :, :, None].expand(1, 16, 16, 3)
    sheet = comparison_grid([("a", clipped), ("b", checker)])
    want = torch.tensor([0.0, 1.0, 64 / 255]).expand(8, 8, 3).clone()  # 0.25 * 255 rounded
    want[3, 3] = 1.0
    assert torch.equal(cell(sheet, 0, 0), want)
    assert torch.equal(cell(sheet, 0, 1), torch.full((8, 8, 3), 128 / 255))  # 127.5 rounded to even


def test_bad_columns_are_refused_by_name():
    for images in (torch.zeros(1, 8, 8), torch.zeros(1, 8, 8, 4)):
        message = f"comparison_grid: column 'b' must be images (B, H, W, 3), got {tuple(images.shape)}"
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            comparison_grid([("a", solid([0, 0, 0], 1)), ("b", images)])
    with pytest.raises(ValueError, match="^comparison_grid: no columns$"):
        comparison_grid([])
