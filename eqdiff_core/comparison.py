"""A comparison sheet: methods side by side, one labelled column per method, one row per prompt."""

from __future__ import annotations

import numpy as np
import torch

LABEL_HEIGHT = 20
PAD = 4


def comparison_grid(columns: list[tuple[str, torch.Tensor]], row_labels: list[str] | None = None) -> torch.Tensor:
    """Lays out ``columns`` (label, images (B, H, W, 3) in [0, 1]) side by side under their labels, row i
    holding image i of every column; a column with fewer images leaves its lower cells white. Images of
    another size than the first column's are resized (bilinear) to it. ``row_labels`` (one per row, e.g.
    the prompts) are written under each row. Returns (1, height, width, 3) float in [0, 1]."""
    from PIL import Image, ImageDraw

    if not columns:
        raise ValueError("comparison_grid: no columns")
    for label, images in columns:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"comparison_grid: column {label!r} must be images (B, H, W, 3), got {tuple(images.shape)}")
    height, width = columns[0][1].shape[1:3]
    rows = max(images.shape[0] for _, images in columns)
    row_labels = list(row_labels or [])
    row_height = height + (LABEL_HEIGHT if row_labels else 0) + PAD
    sheet = Image.new("RGB", (PAD + len(columns) * (width + PAD), LABEL_HEIGHT + rows * row_height + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (label, images) in enumerate(columns):
        x = PAD + c * (width + PAD)
        draw.text((x, 4), label, fill=(0, 0, 0))
        if images.shape[1:3] != (height, width):
            images = torch.nn.functional.interpolate(images.movedim(-1, 1).float(), size=(height, width),
                                                     mode="bilinear", align_corners=False).movedim(1, -1)
        for r, image in enumerate(images):
            pixels = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
            sheet.paste(Image.fromarray(pixels, "RGB"), (x, LABEL_HEIGHT + r * row_height))
    for r, text in enumerate(row_labels[:rows]):
        draw.text((PAD, LABEL_HEIGHT + r * row_height + height + 2), text, fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(sheet, dtype=np.float32) / 255.0)[None]
