"""The comparison sheet: every cell holds its column's image at the place the layout gives, by hand."""

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


def test_bad_columns_are_refused_by_name():
    with pytest.raises(ValueError, match="'b'.*B, H, W, 3"):
        comparison_grid([("a", solid([0, 0, 0], 1)), ("b", torch.zeros(1, 8, 8))])
    with pytest.raises(ValueError, match="no columns"):
        comparison_grid([])
