"""VAE encoding and the UNet's latent space."""

from __future__ import annotations

import torch

from .management import compute_device


def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1] (values outside are kept: magnitude bands exceed 1) -> the VAE's
    raw latent (B, 4, H/8, W/8) on the compute device."""
    return vae.encode(images[..., :3]).to(compute_device(), torch.float32)


def to_unet_space(model, latent: torch.Tensor) -> torch.Tensor:
    """A raw VAE latent -> the latent the UNet denoises (SD1: scaled by 0.18215)."""
    return model.get_model_object("latent_format").process_in(latent)
