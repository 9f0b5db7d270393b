"""EqDiffFFTSplit called in-process as ComfyUI calls it (inference mode, IMAGE tensors)."""

import numpy as np
import pytest
import torch

from eqdiff_core import frequency as fq
from numpy_reference import authors_fft_filtering, numpy_split

DEFAULTS = dict(low_cutoff=0.25, high_cutoff=0.25, shape="circle", profile="ideal", butterworth_order=2,
                grayscale=False, output="signed")


@pytest.fixture
def fft_node(registered_nodes):
    return registered_nodes["EqDiffFFTSplit"]


def run(node, image, **overrides):
    with torch.inference_mode():
        return node.execute(image=image, **{**DEFAULTS, **overrides}).result


def test_signed_split_reconstructs_the_image(fft_node):
    image = torch.rand(3, 37, 50, 3)
    low, high, preview = run(fft_node, image)
    assert low.shape == high.shape == preview.shape == image.shape
    assert low.dtype == torch.float32 and low.device.type == "cpu"
    assert (low + high - image).abs().max() < 1e-5
    assert preview.min() >= 0 and preview.max() <= 1


def test_matches_the_numpy_reference_in_channels_last_layout(fft_node):
    """The independent numpy split (tests/numpy_reference.py) on the same pixels, channels moved."""
    image = torch.rand(2, 32, 24, 3)
    low, high, _ = run(fft_node, image, shape="square", profile="butterworth", butterworth_order=3,
                       low_cutoff=0.3, high_cutoff=0.1)
    ref_low, ref_high = numpy_split(image.movedim(-1, 1).double().numpy(), 0.3, 0.1, "square", "butterworth", 3,
                                    False, "signed")
    np.testing.assert_allclose(low.movedim(-1, 1).numpy(), ref_low, atol=1e-5)
    np.testing.assert_allclose(high.movedim(-1, 1).numpy(), ref_high, atol=1e-5)


def test_the_authors_settings_give_the_authors_bands_after_vae_encode(fft_node):
    """Shape box, grayscale, magnitude, 50 and 5 bins: what VAE Encode makes of the node's outputs (2x - 1)
    equals the numpy re-implementation of the authors' fft_filtering (tests/numpy_reference.py) on the
    photo in [-1, 1]."""
    image = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(0))
    low, high, _ = run(fft_node, image, output="magnitude", grayscale=True, shape="box",
                       low_cutoff=fq.bins_to_cutoff(50, 512), high_cutoff=fq.bins_to_cutoff(5, 512))
    pixels = (image.movedim(-1, 1) * 2 - 1).double().numpy()
    want_low, want_high = authors_fft_filtering(pixels, 50, True), authors_fft_filtering(pixels, 5, False)
    np.testing.assert_allclose((low * 2 - 1).movedim(-1, 1).numpy(), want_low, atol=2e-5)
    np.testing.assert_allclose((high * 2 - 1).movedim(-1, 1).numpy(), want_high, atol=2e-5)
    assert torch.equal(low[..., 0], low[..., 2])


def test_alpha_channel_and_single_pixel_images(fft_node):
    image = torch.rand(2, 1, 1, 4)
    low, high, _ = run(fft_node, image)
    assert low.shape == (2, 1, 1, 4)
    assert torch.allclose(low, image) and high.abs().max() < 1e-6  # a 1x1 image is all DC


def test_bad_setting_names_the_input(fft_node):
    with pytest.raises(ValueError, match="high_cutoff must be a positive"):
        run(fft_node, torch.rand(1, 8, 8, 3), high_cutoff=0.0)
