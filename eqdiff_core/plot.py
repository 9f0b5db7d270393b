"""A loss curve as an image tensor (no plotting library needed)."""

from __future__ import annotations

import numpy as np
import torch


def loss_curve(history: list[float], width: int = 640, height: int = 320, smoothing: int = 20) -> torch.Tensor:
    """Loss per step (thin, grey) and its running mean over ``smoothing`` steps (blue) on a white
    canvas with min/max labels; returns (height, width, 3) float in [0, 1]."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 12, 24, height - 28
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    values = np.asarray([v for v in history if np.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        draw.text((left + 8, top + 8), "no finite loss yet", fill=(0, 0, 0))
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo or 1.0

    def points(series):
        n = max(len(series) - 1, 1)
        return [(left + (right - left) * i / n, bottom - (bottom - top) * (v - lo) / span) for i, v in enumerate(series)]

    kernel = max(1, min(smoothing, values.size))
    running = np.convolve(values, np.ones(kernel) / kernel, mode="valid")
    running = np.concatenate([np.cumsum(values[: kernel - 1]) / np.arange(1, kernel), running])
    if values.size > 1:
        draw.line(points(values), fill=(190, 190, 190), width=1)
        draw.line(points(running), fill=(30, 90, 200), width=2)
    draw.text((4, top - 6), f"{hi:.4g}", fill=(0, 0, 0))
    draw.text((4, bottom - 6), f"{lo:.4g}", fill=(0, 0, 0))
    draw.text((left, bottom + 8), "step 1", fill=(0, 0, 0))
    draw.text((right - 70, bottom + 8), f"step {values.size}", fill=(0, 0, 0))
    draw.text((left + 8, 4), f"loss (last {running[-1]:.4g}, mean of {kernel})", fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
