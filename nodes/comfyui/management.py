"""Devices, model management, progress and interruption.

Models the pack loads itself (GroundingDINO, SAM, the metric encoders) are handed to ComfyUI's model
management through a ModelPatcher, so that ComfyUI can offload them when other models need memory.
"""

from __future__ import annotations

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.utils

InterruptProcessingException = comfy.model_management.InterruptProcessingException


def compute_device() -> torch.device:
    return comfy.model_management.get_torch_device()


def intermediate_device() -> torch.device:
    """Where node outputs (IMAGE, MASK) live between nodes."""
    return comfy.model_management.intermediate_device()


def devices(choice: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) for a ``device`` input: ``auto`` = ComfyUI's, ``cpu``."""
    if choice == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    return comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()


def image_to_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> (B, C, H, W) on the compute device."""
    return image.to(compute_device()).movedim(-1, 1)


def bchw_to_image(tensor: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> ComfyUI IMAGE (B, H, W, C), float32 on the intermediate device."""
    return tensor.movedim(1, -1).to(intermediate_device(), torch.float32).contiguous()


def managed(module: torch.nn.Module, choice: str):
    """A ModelPatcher for a plain torch module on the device of a ``device`` input. ModelPatcher writes
    attributes such as ``device`` on its model, a read-only property of Hugging Face models, so it
    manages a plain container holding the module."""
    load_device, offload_device = devices(choice)
    return comfy.model_patcher.ModelPatcher(torch.nn.ModuleList([module]), load_device, offload_device)


def load(*models) -> None:
    """Puts MODELs, CLIP patchers or ``managed`` modules on their device (ComfyUI may offload others)."""
    comfy.model_management.load_models_gpu(list(models))


def free_memory() -> None:
    comfy.model_management.soft_empty_cache()


def check_interrupted() -> None:
    """Raises InterruptProcessingException when the user cancelled the prompt."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def half_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device has it, else float16 where ComfyUI uses it, else float32."""
    if comfy.model_management.should_use_bf16(device):
        return torch.bfloat16
    return torch.float16 if comfy.model_management.should_use_fp16(device) else torch.float32


def supports_bf16(device: torch.device) -> bool:
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


class Progress:
    """A node's progress bar. Each update is also an interruption point: ComfyUI throttles progress
    updates from 0.9.2 on, and a throttled update no longer checks for a cancelled prompt."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)
        self.total = total

    def update(self, done: int = 1) -> None:
        self.bar.update(done)
        check_interrupted()

    def set(self, value: int, preview=None) -> None:
        """``preview``: ("PNG" | "JPEG", PIL image, max size), shown in the node while it runs."""
        self.bar.update_absolute(value, self.total, preview)
        check_interrupted()
