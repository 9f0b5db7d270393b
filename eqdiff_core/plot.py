"""Plots as image tensors (no plotting library needed): a loss curve, a grid of labelled maps."""

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


def map_grid(maps: list[tuple[str, torch.Tensor]], title: str, cell: int = 160, columns: int = 4) -> torch.Tensor:
    """Maps with values in [0, 1] (each (h, w), grey: 0 black, 1 white), upscaled to ``cell`` pixels (nearest)
    and laid out in rows of ``columns``, each with its label under it, under a title; returns
    (height, width, 3) float in [0, 1]."""
    from PIL import Image, ImageDraw

    label_height, title_height, pad = 16, 22, 8
    rows = max(1, -(-len(maps) // columns))
    width = pad + columns * (cell + pad)
    height = title_height + rows * (cell + label_height + pad) + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 4), title, fill=(0, 0, 0))
    for i, (label, values) in enumerate(maps):
        grey = (values.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        tile = Image.fromarray(grey, "L").resize((cell, cell), Image.NEAREST).convert("RGB")
        x = pad + (i % columns) * (cell + pad)
        y = title_height + (i // columns) * (cell + label_height + pad)
        img.paste(tile, (x, y))
        draw.rectangle([x - 1, y - 1, x + cell, y + cell], outline=(160, 160, 160))
        draw.text((x, y + cell + 2), label, fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
