"""ComfyUI glue shared by the node modules: tensor layouts and devices."""

from __future__ import annotations

import torch

import comfy.model_management


def image_to_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> (B, C, H, W) on the compute device."""
    return image.to(comfy.model_management.get_torch_device()).movedim(-1, 1)


def bchw_to_image(tensor: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> ComfyUI IMAGE (B, H, W, C), float32 on the intermediate device."""
    return tensor.movedim(1, -1).to(comfy.model_management.intermediate_device(), torch.float32).contiguous()
