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


def check_choices(node_cls, **values) -> bool | str:
    """``validate_inputs`` helper: every given combo value must be one of the node's options.

    ComfyUI 0.3.75 does not check V3 combo values itself. Linked inputs arrive as None and are
    checked when they run.
    """
    options = {inp.id: inp.options for inp in node_cls.define_schema().inputs if getattr(inp, "options", None)}
    for name, value in values.items():
        if value is not None and value not in options[name]:
            return f"{name}: {value!r} is not one of {', '.join(map(str, options[name]))}"
    return True
