"""An independent numpy implementation of the frequency split (full fft2 + fftshift, centred bin
indices), the reference for eqdiff_core.frequency in the unit and end-to-end tests."""

import numpy as np


def numpy_low_pass_mask(h, w, cutoff, shape, profile, order):
    """Transfer function on the *shifted* full grid, built from centred bin indices."""
    ky = (np.arange(h) - h // 2) / (h / 2)
    kx = (np.arange(w) - w // 2) / (w / 2)
    if shape == "circle":
        r = np.hypot(ky[:, None], kx[None, :])
    else:
        r = np.maximum(np.abs(ky)[:, None], np.abs(kx)[None, :])
    r = r / cutoff
    if profile == "ideal":
        return (r < 1.0).astype(np.float64)
    if profile == "gaussian":
        return np.exp(-0.5 * r**2)
    return 1.0 / (1.0 + r ** (2 * order))


def numpy_split(x, low_cutoff, high_cutoff, shape, profile, order, grayscale, output):
    """x: (B, C, H, W) float64 -> (low, high) via the complex inverse FFT."""
    b, c, h, w = x.shape
    if grayscale:
        x = x.mean(axis=1, keepdims=True)
    spectrum = np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1))

    def band(transfer):
        return np.fft.ifft2(np.fft.ifftshift(spectrum * transfer, axes=(-2, -1)))

    low = band(numpy_low_pass_mask(h, w, low_cutoff, shape, profile, order))
    high = band(1.0 - numpy_low_pass_mask(h, w, high_cutoff, shape, profile, order))
    if output == "magnitude":
        low, high = np.abs(low), np.abs(high)
    else:
        assert np.abs(low.imag).max() < 1e-9 and np.abs(high.imag).max() < 1e-9
        low, high = low.real, high.real
    if grayscale:
        low, high = np.repeat(low, c, axis=1), np.repeat(high, c, axis=1)
    return low, high


def authors_fft_filtering(pixels, fc, lowpass):
    """The authors' band of a batch, written from their description (eqdiff-method.md §1.1, tools.py):
    the RGB mean repeated to 3 channels, numpy fft2 then fftshift over *all* axes, a 0/1 box of rows
    and columns [c - fc, c + fc) around c = H // 2 (kept for the low band, removed for the high band),
    ifftshift, ifft2 and the magnitude. pixels: (B, 3, H, W) float64 in [-1, 1]."""
    gray = np.repeat(pixels.mean(axis=1, keepdims=True), 3, axis=1)
    spectrum = np.fft.fftshift(np.fft.fft2(gray))
    h, w = gray.shape[-2:]
    cy, cx = h // 2, w // 2
    box = np.zeros(gray.shape)
    box[..., cy - fc:cy + fc, cx - fc:cx + fc] = 1.0
    mask = box if lowpass else 1.0 - box
    return np.abs(np.fft.ifft2(np.fft.ifftshift(spectrum * mask)))
