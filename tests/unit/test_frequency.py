"""eqdiff_core.frequency against an independent numpy implementation (full fft2 + fftshift)."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from eqdiff_core import frequency as fq
from eqdiff_core import training
from numpy_reference import authors_fft_filtering, numpy_low_pass_mask, numpy_split

REAL_SHAPES = ("circle", "square")  # filters with a real inverse, any profile
PHOTO = Path(__file__).resolve().parents[2] / "workflows" / "assets" / "backpack_dog_00.jpg"


def random_images(b, c, h, w, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(-1, 1, (b, c, h, w)))


@pytest.mark.parametrize("shape", REAL_SHAPES)
@pytest.mark.parametrize("profile", fq.PROFILES)
@pytest.mark.parametrize("output", fq.OUTPUTS)
@pytest.mark.parametrize("grayscale", [False, True])
def test_matches_numpy_reference(shape, profile, output, grayscale):
    x = random_images(2, 3, 24, 17)
    got = fq.frequency_split(x, 0.3, 0.12, shape, profile, 3, grayscale, output)
    want = numpy_split(x.numpy(), 0.3, 0.12, shape, profile, 3, grayscale, output)
    for g, r in zip(got, want):
        assert g.dtype == torch.float64 and g.shape == x.shape
        np.testing.assert_allclose(g.numpy(), r, atol=1e-10)


@pytest.mark.parametrize("size", [(1, 1), (1, 9), (9, 1), (2, 3), (7, 5), (33, 64), (64, 33)])
@pytest.mark.parametrize("shape", REAL_SHAPES)
def test_edge_sizes_match_numpy(size, shape):
    x = random_images(3, 1, *size, seed=1)
    got = fq.frequency_split(x, 0.4, None, shape, "ideal", 2, False, "signed")
    want = numpy_split(x.numpy(), 0.4, 0.4, shape, "ideal", 2, False, "signed")
    np.testing.assert_allclose(got[0].numpy(), want[0], atol=1e-10)
    np.testing.assert_allclose(got[1].numpy(), want[1], atol=1e-10)


@pytest.mark.parametrize("shape,profile", [(s, p) for s in REAL_SHAPES for p in fq.PROFILES] + [("box", "ideal")])
@pytest.mark.parametrize("size", [(64, 64), (31, 47)])
def test_signed_bands_reconstruct_input_float32(shape, profile, size):
    x = random_images(4, 3, *size, seed=2).float()
    low, high = fq.frequency_split(x, fq.bins_to_cutoff(5, 64), None, shape, profile, 2)
    assert low.dtype == torch.float32
    assert (low + high - x).abs().max().item() < 1e-5
    assert low.abs().sum() > 0 and high.abs().sum() > 0


def test_authors_bin_cutoffs_are_expressible():
    assert fq.bins_to_cutoff(50, 512) == 0.1953125
    assert fq.bins_to_cutoff(5, 512) == 0.01953125
    # On the full 512 grid the square ideal mask keeps bins |k| <= 49 along both axes.
    radius = fq.frequency_radius(512, 512, "square", dtype=torch.float64)
    kept = fq.low_pass_mask(512, 512, fq.bins_to_cutoff(50), "square", "ideal", dtype=torch.float64)
    k = torch.fft.fftfreq(512, d=1 / 512).abs()
    assert kept[:, 0].bool().tolist() == (k <= 49).tolist()
    assert kept[0, :].bool().tolist() == (k[:257] <= 49).tolist()
    assert radius.shape == (512, 257)
    # ... and it scales: the same cutoff keeps |k| <= 99 on a 1024 grid.
    kept_1024 = fq.low_pass_mask(1024, 1024, fq.bins_to_cutoff(50), "square", "ideal")
    assert int(kept_1024[:, 0].sum()) == 199


def test_gaussian_and_butterworth_values_at_cutoff():
    cutoff = 0.5
    r = fq.frequency_radius(16, 16, "circle", dtype=torch.float64)
    at = (r - cutoff).abs() < 1e-12  # bins exactly at the cutoff radius (k = 4 on 16)
    assert at.any()
    gauss = fq.low_pass_mask(16, 16, cutoff, "circle", "gaussian", dtype=torch.float64)
    butter = fq.low_pass_mask(16, 16, cutoff, "circle", "butterworth", order=4, dtype=torch.float64)
    assert torch.allclose(gauss[at], torch.tensor(math.exp(-0.5), dtype=torch.float64))
    assert torch.allclose(butter[at], torch.tensor(0.5, dtype=torch.float64))
    assert gauss[0, 0] == 1.0 and butter[0, 0] == 1.0


def test_grayscale_repeats_the_split_of_the_channel_mean():
    x = random_images(2, 3, 20, 20, seed=3)
    low, high = fq.frequency_split(x, 0.25, grayscale=True)
    mean_low, mean_high = fq.frequency_split(x.mean(1, keepdim=True), 0.25)
    for c in range(3):
        assert torch.equal(low[:, c], mean_low[:, 0]) and torch.equal(high[:, c], mean_high[:, 0])


def test_magnitude_is_absolute_value_of_signed():
    x = random_images(1, 3, 16, 12, seed=4)
    signed = fq.frequency_split(x, 0.2, 0.05, "square")
    mag = fq.frequency_split(x, 0.2, 0.05, "square", output="magnitude")
    assert all(torch.equal(m, s.abs()) for m, s in zip(mag, signed))
    assert (mag[0] >= 0).all() and (mag[1] >= 0).all()


def test_low_band_of_constant_image_is_the_image():
    x = torch.full((1, 3, 10, 13), 0.7, dtype=torch.float64)
    low, high = fq.frequency_split(x, 0.01)
    assert torch.allclose(low, x) and high.abs().max() < 1e-12


def test_batch_items_are_independent():
    x = random_images(5, 3, 16, 16, seed=5)
    batched = fq.frequency_split(x, 0.3)[0]
    single = torch.cat([fq.frequency_split(x[i : i + 1], 0.3)[0] for i in range(5)])
    assert torch.allclose(batched, single, atol=1e-12)


def test_band_preview_is_displayable():
    x = random_images(3, 3, 32, 32, seed=6).float()
    low, high = fq.frequency_split(x, 0.2)
    for band, signed in ((high, True), (high.abs(), False), (torch.zeros_like(high), True)):
        preview = fq.band_preview(band, signed)
        assert preview.shape == band.shape and preview.min() >= 0 and preview.max() <= 1
    preview = fq.band_preview(high, True)
    assert preview.std() > 0.05  # stretched, not a flat grey
    assert torch.allclose(fq.band_preview(torch.zeros(1, 3, 4, 4)), torch.full((1, 3, 4, 4), 0.5))


def test_band_preview_stretches_to_three_standard_deviations():
    """The docstring's mapping, by hand: a signed band of +-1 (mean 0, std 1) puts +1 at
    0.5 + 0.5 / 3 and -1 at 0.5 - 0.5 / 3; a magnitude band of 0 and 2 (mean 1, std 1) has its
    white point at mean + 3 std = 4, so 2 shows as 0.5; each image is stretched on its own."""
    signed = torch.tensor([1.0, -1.0]).repeat(8).view(1, 1, 4, 4)
    want = torch.where(signed > 0, torch.tensor(0.5 + 0.5 / 3), torch.tensor(0.5 - 0.5 / 3))
    assert torch.allclose(fq.band_preview(signed, True), want)
    magnitude = torch.tensor([0.0, 2.0]).repeat(8).view(1, 1, 4, 4)
    assert torch.allclose(fq.band_preview(magnitude, False), magnitude / 4)
    both = torch.cat([signed, 10 * signed])  # the second image ten times brighter: the same preview
    assert torch.allclose(fq.band_preview(both, True), torch.cat([want, want]))
    assert torch.equal(fq.band_preview(torch.full((1, 1, 2, 2), 9.0), True), torch.ones(1, 1, 2, 2))  # clamped



def test_band_preview_stretches_each_image_by_its_own_statistics():
    """By hand: a signed band of +-0.1 (std 0.1) shows like one of +-1; a magnitude band of 0 and 4 (mean 2,
    std 2) has its white point at 2 + 3 * 2 = 8, one of 0 and 0.2 (mean 0.1, std 0.1) at 0.4, so 4 and 0.2
    both show as 0.5, each image of a batch by its own; a signed value below -3 std is clamped to black
    (nine zeros and a -3: std 0.9, so -3 maps to 0.5 - 0.5 * 3 / 2.7 < 0)."""
    signed = torch.tensor([1.0, -1.0]).repeat(8).view(1, 1, 4, 4)
    want = torch.where(signed > 0, torch.tensor(0.5 + 0.5 / 3), torch.tensor(0.5 - 0.5 / 3))
    assert torch.allclose(fq.band_preview(0.1 * signed, True), want)
    magnitude = torch.tensor([0.0, 4.0]).repeat(8).view(1, 1, 4, 4)
    preview = fq.band_preview(torch.cat([magnitude, magnitude / 20]), False)
    assert preview.shape == (2, 1, 4, 4) and torch.allclose(preview, torch.cat([magnitude, magnitude]) / 8)
    outlier = torch.tensor([0.0] * 9 + [-3.0]).view(1, 1, 1, 10)
    assert torch.equal(fq.band_preview(outlier, True), torch.tensor([0.5] * 9 + [0.0]).view(1, 1, 1, 10))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"low_cutoff": 0.0}, "low_cutoff must be a positive"),
        ({"low_cutoff": -0.1}, "low_cutoff must be a positive"),
        ({"low_cutoff": float("nan")}, "low_cutoff must be a positive"),
        ({"low_cutoff": 0.2, "high_cutoff": float("inf")}, "high_cutoff must be a positive"),
        ({"low_cutoff": 0.2, "shape": "triangle"}, "shape must be one of circle, square"),
        ({"low_cutoff": 0.2, "profile": "box"}, "profile must be one of ideal, gaussian, butterworth"),
        ({"low_cutoff": 0.2, "output": "abs"}, "output must be one of signed, magnitude"),
        ({"low_cutoff": 0.2, "profile": "butterworth", "order": 0}, "butterworth order must be at least 1"),
    ],
)
def test_invalid_settings_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match="^" + message):  # anchored: the message is what the user reads
        fq.frequency_split(random_images(1, 3, 8, 8), **kwargs)


def test_wrong_layout_and_sizes_are_rejected():
    with pytest.raises(ValueError, match=r"^images must be \(B, C, H, W\)"):
        fq.frequency_split(torch.zeros(8, 8, 3), 0.2)
    with pytest.raises(ValueError, match=r"^size must be positive, got 0$"):
        fq.bins_to_cutoff(50, 0)
    with pytest.raises(ValueError, match=r"^image size must be at least 1x1, got 0x4$"):
        fq.frequency_radius(0, 4)
    assert fq.bins_to_cutoff(50, 512) == 50 / 256 and fq.bins_to_cutoff(5) == 5 / 256


def rfft_grid(mask):
    """numpy_low_pass_mask (shifted full grid) laid out like rfft2's output."""
    return np.fft.ifftshift(mask)[:, : mask.shape[1] // 2 + 1]


def test_low_pass_mask_defaults_and_butterworth_order_1():
    """Defaults are a circle, the ideal profile, float32 and butterworth order 2; order 1 is allowed
    (1 / (1 + r^2)); all against the numpy reference."""
    ideal = fq.low_pass_mask(16, 12, 0.5)
    assert ideal.dtype == torch.float32 and fq.low_pass_mask(16, 12, 0.5, dtype=torch.float64).dtype == torch.float64
    np.testing.assert_array_equal(ideal.numpy(), rfft_grid(numpy_low_pass_mask(16, 12, 0.5, "circle", "ideal", 2)))
    for order in (1, 2):
        kwargs = {} if order == 2 else {"order": 1}
        got = fq.low_pass_mask(16, 12, 0.5, profile="butterworth", dtype=torch.float64, **kwargs)
        want = rfft_grid(numpy_low_pass_mask(16, 12, 0.5, "circle", "butterworth", order))
        np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    x = random_images(1, 2, 12, 10, seed=8)
    got = fq.frequency_split(x, 0.3, 0.1, profile="butterworth")  # frequency_split's default order is 2 too
    for g, r in zip(got, numpy_split(x.numpy(), 0.3, 0.1, "circle", "butterworth", 2, False, "signed")):
        np.testing.assert_allclose(g.numpy(), r, atol=1e-10)


def test_low_pass_filters_any_leading_shape():
    """low_pass takes (..., H, W): a single 2-D image, against numpy's rfft2 / irfft2."""
    x = random_images(1, 1, 9, 7, seed=9)[0, 0]
    mask = fq.low_pass_mask(9, 7, 0.4, "square", dtype=torch.float64)
    want = np.fft.irfft2(np.fft.rfft2(x.numpy()) * mask.numpy(), s=(9, 7))
    np.testing.assert_allclose(fq.low_pass(x, mask).numpy(), want, atol=1e-12)


def test_half_precision_input_is_split_in_float32():
    x = random_images(1, 3, 8, 8, seed=10).half()
    low, high = fq.frequency_split(x, 0.3)
    want = fq.frequency_split(x.float(), 0.3)
    assert low.dtype == high.dtype == torch.float32
    assert torch.equal(low, want[0]) and torch.equal(high, want[1])


def test_box_bin_indices_are_compared_in_float64():
    """c = cutoff * 8 / 2 = 3 + 1e-9 bins: [-c, c) holds bins -3 ... 3 (by hand); a float32 c would be 3.0."""
    mask = fq.box_mask(8, 8, (3 + 1e-9) / 4, dtype=torch.float64)
    k = torch.fft.fftfreq(8, d=1 / 8)
    assert sorted(int(v) for v in k[mask[:, 0].bool()]) == [-3, -2, -1, 0, 1, 2, 3]


def test_exact_messages_of_low_level_checks():
    nyquist = "must be a positive fraction of the Nyquist radius (e.g. 0.1953125 = 50 bins on a 512 grid); got 0.0"
    with pytest.raises(ValueError, match="^" + re.escape("cutoff " + nyquist) + "$"):
        fq.low_pass_mask(8, 8, 0.0)
    with pytest.raises(ValueError, match="^" + re.escape("shape must be one of circle, square; got 'box'") + "$"):
        fq.frequency_radius(8, 8, "box")  # the box has no radius: only box_mask draws it
    with pytest.raises(ValueError, match="^" + re.escape("profile must be one of ideal; got 'gaussian'") + "$"):
        fq.frequency_split(random_images(1, 1, 8, 8), 0.2, shape="box", profile="gaussian")
    assert fq.bins_to_cutoff(1, 1) == 2.0  # a 1-pixel grid is valid: 1 bin / (1 / 2)


def test_every_tensor_is_made_on_the_inputs_device():
    """Meta stands in for an accelerator: a helper tensor made on the CPU would meet a meta one and fail,
    or come back on the CPU."""
    x = torch.empty(2, 3, 8, 8, device="meta")
    for kwargs in ({}, {"high_cutoff": 0.3}, {"shape": "box"}, {"shape": "box", "high_cutoff": 0.3}):
        assert [b.device.type for b in fq.frequency_split(x, 0.5, **kwargs)] == ["meta", "meta"], kwargs
    for shape in ("circle", "square"):
        assert fq.frequency_radius(8, 6, shape, device="meta").device.type == "meta"
    assert fq.low_pass_mask(8, 6, 0.5, device="meta").device.type == "meta"
    assert fq.box_mask(8, 6, 0.5, device="meta").device.type == "meta"


@pytest.mark.cuda
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = random_images(4, 3, 128, 96, seed=7).float()
    for kwargs in ({}, {"shape": "square", "grayscale": True, "output": "magnitude", "high_cutoff": 0.02}):
        cpu = fq.frequency_split(x, 0.2, **kwargs)
        gpu = fq.frequency_split(x.cuda(), 0.2, **kwargs)
        assert all(g.device.type == "cuda" for g in gpu)
        for c, g in zip(cpu, gpu):
            assert torch.allclose(c, g.cpu(), atol=1e-5)


def photo_pixels(size=512) -> torch.Tensor:
    """The shipped photo at size x size in [-1, 1], (1, 3, H, W) float64, as the authors' loader gives it."""
    from PIL import Image

    image = Image.open(PHOTO).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float64) / 127.5 - 1.0).permute(2, 0, 1)[None].contiguous()


def test_box_is_the_authors_filter_on_the_shipped_photo():
    """The official bands (box, grayscale, magnitude; 50 and 5 bins on 512 px) equal an independent
    numpy re-implementation of the authors' fft_filtering (tests/numpy_reference.py, written from
    eqdiff-method.md §1.1), in float64 to rounding and in float32 as training computes them."""
    x = photo_pixels()
    want_low, want_high = authors_fft_filtering(x.numpy(), 50, True), authors_fft_filtering(x.numpy(), 5, False)
    low, high = fq.frequency_split(x, fq.bins_to_cutoff(50), fq.bins_to_cutoff(5), "box", "ideal", 2, True,
                                   "magnitude")
    np.testing.assert_allclose(low.numpy(), want_low, atol=1e-12)
    np.testing.assert_allclose(high.numpy(), want_high, atol=1e-12)
    official = training.frequency_bands(x.float(), training.PRESETS["official"])
    np.testing.assert_allclose(official[0].numpy(), want_low, atol=2e-5)
    np.testing.assert_allclose(official[1].numpy(), want_high, atol=2e-5)
    # the symmetric box (bins |k| <= 49 kept, |k| <= 4 removed) differs by what the fidelity review measured
    square = fq.frequency_split(x, fq.bins_to_cutoff(50), fq.bins_to_cutoff(5), "square", "ideal", 2, True, "magnitude")
    relative = [float(np.linalg.norm(s.numpy() - w) / np.linalg.norm(w)) for s, w in zip(square, (want_low, want_high))]
    assert relative == pytest.approx([0.021, 0.178], abs=0.001)


def test_box_keeps_one_more_bin_on_the_negative_side():
    mask = fq.box_mask(512, 512, fq.bins_to_cutoff(50), dtype=torch.float64)
    k = torch.fft.fftfreq(512, d=1 / 512)
    kept = sorted(int(v) for v in k[mask[:, 0].bool()])
    assert kept == list(range(-50, 50))
    assert mask.sum() == 100 * 100


def test_box_signed_output_is_the_real_part_of_the_complex_band():
    x = random_images(2, 3, 32, 40, seed=3)
    low, high = fq.frequency_split(x, 0.25, 0.1, "box", "ideal", 2, False, "signed")
    spectrum = np.fft.fftshift(np.fft.fft2(x.numpy()), axes=(-2, -1))
    ky = np.arange(32) - 16
    kx = np.arange(40) - 20

    def box(c_y, c_x):
        return ((ky >= -c_y) & (ky < c_y))[:, None] & ((kx >= -c_x) & (kx < c_x))[None, :]

    band = lambda m: np.fft.ifft2(np.fft.ifftshift(spectrum * m, axes=(-2, -1)))  # noqa: E731
    np.testing.assert_allclose(low.numpy(), band(box(0.25 * 16, 0.25 * 20)).real, atol=1e-10)
    np.testing.assert_allclose(high.numpy(), band(~box(0.1 * 16, 0.1 * 20)).real, atol=1e-10)
    with pytest.raises(ValueError, match="profile"):
        fq.frequency_split(x, 0.25, 0.1, "box", "gaussian")
