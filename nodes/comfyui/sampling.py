"""Sampling through ComfyUI's sampler: the DDIM sampler and single model evaluations.

Everything that evaluates a MODEL goes through ``comfy.sample.sample_custom``, the path every ComfyUI
sampler takes, so the sampler-side setup (loading, weight patches, wrappers, Dynamic VRAM) is always
ComfyUI's own.
"""

from __future__ import annotations

import torch

import comfy.sample
import comfy.samplers
import latent_preview
from comfy.k_diffusion.sampling import default_noise_sampler

from ...eqdiff_core import sampling


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, noise_sampler=None):
    """k-diffusion style sampler function: DDIM updates over the given sigmas."""
    extra_args = {} if extra_args is None else extra_args
    if eta > 0.0 and noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        noise = noise_sampler(sigmas[i], sigmas[i + 1]) if eta > 0.0 else None
        x = sampling.ddim_step(x, denoised, sigmas[i], sigmas[i + 1], eta, noise)
    return x


def ddim_sampler(eta: float) -> comfy.samplers.KSAMPLER:
    return comfy.samplers.KSAMPLER(sample_ddim, extra_options={"eta": eta})


def ddim_schedule(model, steps: int) -> torch.Tensor:
    return sampling.ddim_sigmas(model.get_model_object("model_sampling").sigmas.float().cpu(), steps)


def sample(model, positive, negative, latent: dict, seed: int, sampler, sigmas: torch.Tensor, cfg: float) -> dict:
    """A LATENT sampled from ``latent`` (its noise mask honoured) as KSampler does: seeded noise,
    previews and progress in the node, interruption at every step."""
    latent = latent.copy()
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    latent["samples"] = comfy.sample.sample_custom(
        model, noise, cfg, sampler, sigmas, positive, negative, samples, noise_mask=latent.get("noise_mask"),
        callback=callback, seed=seed)
    latent.pop("noise_mask", None)
    return latent


def seeded_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial noise KSampler draws for a latent of ``shape`` and ``seed`` (on the CPU)."""
    return comfy.sample.prepare_noise(torch.zeros(shape), seed)


def ddim_from_noise(model, positive, negative, noise: torch.Tensor, steps: int, cfg: float, on_step) -> torch.Tensor:
    """Raw latents sampled by DDIM (eta 0: no noise drawn after the start) from the given initial noise
    (B, 4, h, w); ``on_step()`` after every step."""
    return comfy.sample.sample_custom(model, noise, cfg, ddim_sampler(0.0), ddim_schedule(model, steps), positive,
                                      negative, torch.zeros_like(noise), callback=lambda *args: on_step())


@torch.no_grad()
def _evaluate_once(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))


def evaluate_once(model, positive, latent: torch.Tensor, percent: float, seed: int) -> torch.Tensor:
    """One evaluation of MODEL with ``positive`` (CFG 1: the conditional branch only) on ``latent`` (raw,
    (B, 4, h, w)) noised with seeded noise to ``percent`` of the schedule; returns the denoised latent."""
    sigma = float(model.get_model_object("model_sampling").percent_to_sigma(percent))
    noise = comfy.sample.prepare_noise(latent, seed)
    sampler = comfy.samplers.KSAMPLER(_evaluate_once)
    return comfy.sample.sample_custom(model, noise, 1.0, sampler, torch.tensor([sigma, 0.0]), positive, positive,
                                      latent, seed=seed)
