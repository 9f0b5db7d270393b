"""Frequency split of images into low- and high-frequency bands (paper §3.2, Eq. 3-4).

The paper filters with a circular ideal mask of radius f_c around the centre of the shifted
spectrum (Eq. 4). The authors' code uses a square box of absolute bin cutoffs on a 512x512 grid
(50 for the low band, 5 for the high band), works on the grayscale image and trains on the
magnitude of the inverse FFT. Every one of these choices is a parameter here.

Their box (``shape="box"``) is the half-open range of bins [-c, c) along each axis, e.g. bins
-50 ... 49 kept for the low band and -5 ... 4 removed for the high band on 512 px: one bin more on
the negative side, so the filtered spectrum is not Hermitian and the inverse FFT is complex; they
train on its magnitude. ``square`` is the symmetric box |k| < c, whose inverse is real.

Cutoffs are fractions of the Nyquist radius, so they scale with the image size: along each axis
the normalised frequency is ``k / (N / 2)`` for FFT bin ``k``, in [-1, 1). An absolute bin
cutoff ``b`` on an ``N`` grid is ``bins_to_cutoff(b, N)``; the authors' 50 and 5 bins on 512 are
0.1953125 and 0.01953125.

All functions run on the device of their input tensors (``torch.fft``), in float32 unless the
input is float64.
"""

from __future__ import annotations

import torch

SHAPES = ("circle", "square", "box")
PROFILES = ("ideal", "gaussian", "butterworth")
OUTPUTS = ("signed", "magnitude")


def bins_to_cutoff(bins: float, size: int = 512) -> float:
    """Cutoff (fraction of the Nyquist radius) equal to ``bins`` FFT bins on a ``size`` grid."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return bins / (size / 2)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_cutoff(name: str, cutoff: float) -> None:
    if not 0.0 < cutoff < float("inf"):
        raise ValueError(
            f"{name} must be a positive fraction of the Nyquist radius (e.g. 0.1953125 = 50 bins "
            f"on a 512 grid); got {cutoff}"
        )


def frequency_radius(
    height: int,
    width: int,
    shape: str = "circle",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Normalised distance of every ``rfft2`` bin from the zero frequency.

    Returns a (height, width // 2 + 1) tensor laid out like ``torch.fft.rfft2``'s output (no
    shift). ``circle`` is the Euclidean radius of Eq. 4, ``square`` the Chebyshev distance (a
    symmetric box). 1.0 is the Nyquist frequency along an axis.
    """
    _check_choice("shape", shape, SHAPES[:2])
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1x1, got {height}x{width}")
    fy = torch.fft.fftfreq(height, device=device, dtype=dtype).abs_().mul_(2.0)
    fx = torch.fft.rfftfreq(width, device=device, dtype=dtype).mul_(2.0)
    if shape == "circle":
        return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return torch.maximum(fy[:, None], fx[None, :])


def low_pass_mask(
    height: int,
    width: int,
    cutoff: float,
    shape: str = "circle",
    profile: str = "ideal",
    order: int = 2,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Low-pass transfer function L(u, v) on the ``rfft2`` grid, shape (height, width // 2 + 1).

    ``ideal`` keeps bins with radius r < cutoff (1 - H of Eq. 4; with cutoff = 50 / 256 it keeps
    |k| <= 49 on a 512 grid, the symmetric part of the authors' box). ``gaussian`` is
    exp(-r^2 / (2 cutoff^2)), ``butterworth`` 1 / (1 + (r / cutoff)^(2 order)).
    """
    _check_cutoff("cutoff", cutoff)
    _check_choice("profile", profile, PROFILES)
    if profile == "butterworth" and order < 1:
        raise ValueError(f"butterworth order must be at least 1, got {order}")
    r = frequency_radius(height, width, shape, device, dtype) / cutoff
    if profile == "ideal":
        return (r < 1.0).to(dtype)
    if profile == "gaussian":
        return torch.exp(-0.5 * r * r)
    return 1.0 / (1.0 + r.pow(2 * order))


def low_pass(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Filter real images (..., H, W) with a transfer function on the ``rfft2`` grid."""
    h, w = images.shape[-2:]
    spectrum = torch.fft.rfft2(images)  # Eq. 3 (unnormalised; the inverse undoes the scale)
    return torch.fft.irfft2(spectrum * mask, s=(h, w))


def frequency_split(
    images: torch.Tensor,
    low_cutoff: float,
    high_cutoff: float | None = None,
    shape: str = "circle",
    profile: str = "ideal",
    order: int = 2,
    grayscale: bool = False,
    output: str = "signed",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split images into a low- and a high-frequency band.

    Args:
        images: (B, C, H, W) real tensor; any value range (the authors' code uses [-1, 1]).
        low_cutoff: the low band keeps frequencies below this fraction of the Nyquist radius.
        high_cutoff: the high band removes frequencies below this one; ``None`` = ``low_cutoff``.
            With equal cutoffs the bands are complementary: in ``signed`` output,
            low + high == images (after grayscale, if chosen) to float precision.
        shape, profile, order: the filter (see ``low_pass_mask``); ``box`` is the authors' box
            (see the module doc), with the ideal profile only.
        grayscale: average the channels first (the authors' code) and repeat the result to C
            channels; otherwise every channel is filtered on its own.
        output: ``signed`` keeps the real band images; ``magnitude`` takes their absolute value,
            the |IFFT| the authors' code trains on.

    Returns:
        (low, high), each (B, C, H, W), float32 (float64 for float64 input).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    _check_choice("output", output, OUTPUTS)
    high_cutoff = low_cutoff if high_cutoff is None else high_cutoff
    _check_cutoff("low_cutoff", low_cutoff)
    _check_cutoff("high_cutoff", high_cutoff)

    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(dtype)
    channels = x.shape[1]
    if grayscale:
        x = x.mean(dim=1, keepdim=True)
    h, w = x.shape[-2:]

    if shape == "box":
        _check_choice("profile", profile, ("ideal",))
        low, high = _box_split(x, low_cutoff, high_cutoff, output)
    else:
        low, high = _split(x, low_cutoff, high_cutoff, shape, profile, order, output)
    if grayscale:
        low, high = low.expand(-1, channels, -1, -1), high.expand(-1, channels, -1, -1)
    return low.contiguous(), high.contiguous()


def _split(x, low_cutoff, high_cutoff, shape, profile, order, output):
    """Real filters on the ``rfft2`` grid: circle or symmetric square, any profile."""
    h, w = x.shape[-2:]
    low = low_pass(x, low_pass_mask(h, w, low_cutoff, shape, profile, order, x.device, x.dtype))
    if high_cutoff == low_cutoff:
        high = x - low
    else:
        high = x - low_pass(x, low_pass_mask(h, w, high_cutoff, shape, profile, order, x.device, x.dtype))
    if output == "magnitude":
        low, high = low.abs(), high.abs()
    return low, high


def box_mask(height: int, width: int, cutoff: float, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The authors' box on the full (unshifted) ``fft2`` grid, (height, width): 1 where both bin
    indices k lie in [-c, c), c = cutoff * N / 2 bins (50 on 512 px for cutoff 0.1953125)."""
    def axis(n):
        k = torch.fft.fftfreq(n, d=1.0 / n, device=device, dtype=torch.float64)  # integer bin indices
        c = cutoff * n / 2
        return (k >= -c) & (k < c)

    return (axis(height)[:, None] & axis(width)[None, :]).to(dtype)


def _box_split(x, low_cutoff, high_cutoff, output):
    """The authors' filter: |IFFT(F B_low)| and |IFFT(F (1 - B_high))| with their box B (``signed``:
    the real parts)."""
    h, w = x.shape[-2:]
    spectrum = torch.fft.fft2(x)
    low = torch.fft.ifft2(spectrum * box_mask(h, w, low_cutoff, x.device, x.dtype))
    high = torch.fft.ifft2(spectrum * (1.0 - box_mask(h, w, high_cutoff, x.device, x.dtype)))
    if output == "magnitude":
        return low.abs(), high.abs()
    return low.real, high.real


def band_preview(band: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Map a band (B, C, H, W) to [0, 1] for display, with a per-image contrast stretch.

    Signed bands put zero at mid-grey and +-3 standard deviations at black/white; magnitude
    bands put zero at black and mean + 3 standard deviations at white.
    """
    flat = band.flatten(1)
    if signed:
        scale = 3.0 * flat.std(dim=1, unbiased=False).clamp_min(1e-8)
        out = 0.5 + 0.5 * band / scale.view(-1, 1, 1, 1)
    else:
        scale = (flat.mean(dim=1) + 3.0 * flat.std(dim=1, unbiased=False)).clamp_min(1e-8)
        out = band / scale.view(-1, 1, 1, 1)
    return out.clamp(0.0, 1.0)
