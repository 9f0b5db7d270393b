"""eqdiff_core.plot: pixels at places computed by hand from the documented layout."""

import math

import numpy as np

import torch

from eqdiff_core import plot

GREY, BLUE = (190, 190, 190), (30, 90, 200)


def rgb(image, x, y):
    return tuple(round(float(c) * 255) for c in image[round(y), round(x)])


def test_loss_curve_draws_the_loss_and_its_running_mean():
    """Plot area x 56 .. 628, y 24 .. 292 at 640 x 320. History [1, 3] with smoothing 20: the running
    mean over min(20, 2) = 2 steps is [1, 2] (the first point averages what there is). The loss line
    goes from (56, 292) to (628, 24), the mean line from (56, 292) to (628, 158)."""
    image = plot.loss_curve([1.0, float("nan"), 3.0])  # non-finite values are left out
    assert image.shape == (320, 640, 3) and image.dtype == torch.float32
    assert torch.equal(image, plot.loss_curve([1.0, 3.0]))
    left, right, top, bottom = 56, 628, 24, 292
    mid_x = (left + right) / 2
    assert rgb(image, mid_x, (top + bottom) / 2) == GREY  # loss line at half way: value 2
    assert rgb(image, mid_x, (bottom + (top + bottom) / 2) / 2) == BLUE  # mean line at half way: value 1.5
    assert rgb(image, mid_x, 290) == (255, 255, 255)
    assert rgb(image, left, 100) == (160, 160, 160) and rgb(image, right, 100) == (160, 160, 160)  # the frame
    flat = plot.loss_curve([2.0, 2.0])  # no span: the lines lie on the bottom edge
    assert rgb(flat, mid_x, 292) == BLUE and rgb(flat, mid_x, (top + bottom) / 2) == (255, 255, 255)
    empty = plot.loss_curve([float("inf")])
    assert (empty < 1).any() and rgb(empty, mid_x, (top + bottom) / 2) == (255, 255, 255)  # just the message


def test_map_grid_places_each_map_under_the_title_in_rows():
    """cell 10, columns 2, padding 8, title 22, label 16: map i at x = 8 + (i % 2) * 18,
    y = 22 + (i // 2) * 34; width 8 + 2 * 18 = 44, height 22 + 2 * 34 + 8 = 98."""
    maps = [("a", torch.full((2, 2), 0.0)), ("b", torch.full((2, 2), 0.5)), ("c", torch.tensor([[1.0, 0.0], [0.0, 1.0]]))]
    image = plot.map_grid(maps, "title", cell=10, columns=2)
    assert image.shape == (98, 44, 3)
    assert rgb(image, 8 + 5, 22 + 5) == (0, 0, 0)
    assert rgb(image, 26 + 5, 22 + 5) == (128, 128, 128)  # 0.5 * 255 rounded
    assert rgb(image, 8 + 2, 56 + 2) == (255, 255, 255) and rgb(image, 8 + 7, 56 + 2) == (0, 0, 0)  # nearest upscale
    assert rgb(image, 26 + 5, 56 + 5) == (255, 255, 255)  # no fourth map: background
    assert rgb(image, 7, 22 + 5) == (160, 160, 160)  # the frame, one pixel outside the cell
    assert math.isclose(float(plot.map_grid(maps[:1], "t", cell=10, columns=2).shape[0]), 22 + 34 + 8)


def test_map_grid_draws_title_and_labels_in_black_at_their_places():
    """Layout as above: the title at (8, 4), label i at (x_i, y_i + cell + 2) in PIL's default font, black on
    white; compared with strips drawn here (title: rows 0-20; first labels: rows 33-54, the frames excluded)."""
    from PIL import Image, ImageDraw

    maps = [("a", torch.zeros(2, 2)), ("b", torch.zeros(2, 2)), ("c", torch.zeros(2, 2))]
    image = (plot.map_grid(maps, "title", cell=10, columns=2).numpy() * 255).round().astype(np.uint8)
    for rows, texts in [((0, 21), [((8, 4), "title")]), ((33, 55), [((8, 34 - 33), "a"), ((26, 34 - 33), "b")]),
                        ((67, 98), [((8, 68 - 67), "c")])]:
        strip = Image.new("RGB", (44, rows[1] - rows[0]), (255, 255, 255))
        for xy, text in texts:
            ImageDraw.Draw(strip).text(xy, text, fill=(0, 0, 0))
        assert np.array_equal(image[rows[0]:rows[1]], np.asarray(strip)), texts


def test_map_grid_defaults_clipping_nearest_upscale_and_frame():
    """Defaults cell 160, columns 4: width 8 + 4 * 168 = 680, height 22 + 184 + 8 = 214. Values are clipped
    to [0, 1] before the 8-bit grey (-0.5 black, 1.5 and 2 white, 0.25 -> 64); each source pixel becomes a
    5 x 5 block at cell 10; the frame's top line is the row above the cell."""
    image = plot.map_grid([("m", torch.rand(3, 3))], "t")
    assert image.shape == (214, 680, 3) and image.dtype == torch.float32
    values = torch.tensor([[-0.5, 1.5], [2.0, 0.25]])
    image = plot.map_grid([("m", values)], "t", cell=10, columns=2)
    tile = (image[22:32, 8:18, 0].numpy() * 255).round()
    assert np.array_equal(tile, np.kron(np.array([[0, 255], [255, 64]]), np.ones((5, 5))))
    assert (image[21, 7:19] * 255).round().tolist() == [[160.0] * 3] * 12


def drawn(lines, texts, size=(640, 320)):
    """The expected plot drawn here with PIL from the documented layout: white canvas, grey frame
    around the plot area (56, 24) .. (width - 12, height - 28), the (points, colour, width) lines, black texts."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle([56, 24, size[0] - 12, size[1] - 28], outline=(160, 160, 160))
    for points, colour, width in lines:
        draw.line(points, fill=colour, width=width)
    for xy, text in texts:
        draw.text(xy, text, fill=(0, 0, 0))
    return np.asarray(img)


def pixels(image):
    return (image.numpy() * 255).round().astype(np.uint8)


def labels(hi, lo, steps, last, kernel):
    """max at (4, top - 6), min at (4, bottom - 6), step labels at (left, bottom + 8) and (right - 70, bottom + 8),
    the title at (left + 8, 4)."""
    return [((4, 18), hi), ((4, 286), lo), ((56, 300), "step 1"), ((558, 300), f"step {steps}"),
            ((64, 4), f"loss (last {last}, mean of {kernel})")]


def test_loss_curve_is_the_documented_plot_pixel_for_pixel():
    """History [4, 1, 3, 2], smoothing 3: the running mean is [4, 2.5, 8/3, 2] (the first points average
    what there is); x_i = 56 + 572 i / 3, y(v) = 292 - 268 (v - 1) / 3 (min 1, max 4). The loss is grey,
    1 px wide, the mean blue, 2 px wide."""
    x = [56 + 572 * i / 3 for i in range(4)]
    y = [292 - 268 * (v - 1) / 3 for v in (4, 1, 3, 2, 2.5, 8 / 3)]
    want = drawn([(list(zip(x, y[:4])), GREY, 1), (list(zip(x, [y[0], y[4], y[5], y[3]])), BLUE, 2)],
                 labels("4", "1", 4, "2", 3))
    assert np.array_equal(pixels(plot.loss_curve([4.0, 1.0, 3.0, 2.0], smoothing=3)), want)


def test_loss_curve_defaults_to_a_running_mean_of_20_steps():
    """Five steps at 1 then twenty at 3: the mean of step i is over steps max(1, i - 19) .. i, the last one 3."""
    history = [1.0] * 5 + [3.0] * 20
    mean = [sum(history[max(0, i - 19):i + 1]) / len(history[max(0, i - 19):i + 1]) for i in range(25)]
    x = [56 + 572 * i / 24 for i in range(25)]
    y = [292 - 268 * (v - 1) / 2 for v in history + mean]
    want = drawn([(list(zip(x, y[:25])), GREY, 1), (list(zip(x, y[25:])), BLUE, 2)], labels("3", "1", 25, "3", 20))
    assert np.array_equal(pixels(plot.loss_curve(history)), want)


def test_loss_curve_of_one_step_and_of_none():
    """One value: no line, the labels only (mean of 1 step); no finite value: the frame and the message
    at (left + 8, top + 8), as float32 like every plot."""
    assert np.array_equal(pixels(plot.loss_curve([2.0])), drawn([], labels("2", "2", 1, "2", 1)))
    empty = plot.loss_curve([float("nan")])
    assert empty.dtype == torch.float32
    assert np.array_equal(pixels(empty), drawn([], [((64, 32), "no finite loss yet")]))


def test_loss_curve_averages_float32_losses_in_float64():
    """2**24 and 2**24 + 2 are exact float32 numbers whose float32 sum rounds to 2**25: numpy float32 losses
    must plot like the same numbers as Python floats."""
    history = [2.0 ** 24, 2.0 ** 24 + 2, 2.0 ** 24 + 2]
    assert torch.equal(plot.loss_curve([np.float32(v) for v in history], smoothing=3),
                       plot.loss_curve(history, smoothing=3))
