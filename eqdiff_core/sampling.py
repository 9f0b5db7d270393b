"""DDIM sampling (Song et al., ICLR 2021) in the sigma parameterisation that ComfyUI samples in.

ComfyUI's latent at noise level sigma is x = x_0 + sigma * eps, the variance-preserving latent of
DDPM divided by sqrt(alpha_bar), with alpha_bar = 1 / (1 + sigma^2). The schedule here is the one
diffusers' ``DDIMScheduler`` uses for Stable Diffusion 1.x (``timestep_spacing="leading"``,
``steps_offset=1``, ``set_alpha_to_one=False``): timesteps 981, 961, ..., 1 for 50 steps, and a
last step to alpha_bar_0 rather than to 1.
"""

from __future__ import annotations

import torch


def ddim_timesteps(steps: int, train_timesteps: int = 1000) -> list[int]:
    """The DDIM timesteps, noisiest first: [(steps - 1) * k + 1, ..., 1] with k = train_timesteps // steps."""
    if not 1 <= steps <= train_timesteps:
        raise ValueError(f"steps must be between 1 and {train_timesteps}, got {steps}")
    stride = train_timesteps // steps
    return [i * stride + 1 for i in reversed(range(steps))]


def ddim_sigmas(train_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """Sigmas of the DDIM schedule, (steps + 1,): sigma(t) at each timestep, then sigma(0).

    ``train_sigmas`` are the model's sigmas for timesteps 0 .. T-1, sqrt((1 - a_t) / a_t).
    """
    ts = ddim_timesteps(steps, train_sigmas.shape[0])
    return torch.cat([train_sigmas[ts], train_sigmas[:1]]).float()


def ddim_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update (Song et al. Eq. 12) from noise level sigma to sigma_next.

    With a = 1 / (1 + sigma^2) and the predicted noise eps = (x - x_0) / sigma:
        s     = eta * sqrt((1 - a_next) / (1 - a)) * sqrt(1 - a / a_next)
        x_vp' = sqrt(a_next) x_0 + sqrt(1 - a_next - s^2) eps + s z
    returned divided by sqrt(a_next). With eta = 0 this is x_0 + sigma_next * eps.
    x, denoised, noise: (B, C, H, W).
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float64)
    eps = (x - denoised) / sigma.to(x.dtype)
    if eta == 0.0 or float(sigma_next) == 0.0:
        return denoised + sigma_next.to(x.dtype) * eps
    a, a_next = 1.0 / (1.0 + sigma**2), 1.0 / (1.0 + sigma_next**2)
    s = eta * torch.sqrt((1 - a_next) / (1 - a)) * torch.sqrt(1 - a / a_next)
    direction = torch.sqrt(torch.clamp(1 - a_next - s**2, min=0.0) / a_next)
    if noise is None:
        raise ValueError("eta > 0 needs noise")
    return denoised + direction.to(x.dtype) * eps + (s / torch.sqrt(a_next)).to(x.dtype) * noise
