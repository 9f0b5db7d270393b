"""eqdiff_core.sampling: the SD1.x DDIM schedule and update, against the DDIM paper's VP form."""

import numpy as np
import pytest
import torch

from eqdiff_core import sampling


def sd_alphas_cumprod():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return np.cumprod(1.0 - betas)


def test_timesteps_are_diffusers_leading_with_offset_one():
    assert sampling.ddim_timesteps(50)[:3] == [981, 961, 941] and sampling.ddim_timesteps(50)[-1] == 1
    assert len(sampling.ddim_timesteps(50)) == 50
    assert sampling.ddim_timesteps(1) == [1]
    with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
        sampling.ddim_timesteps(0)


def test_sigmas_end_at_alpha_bar_zero():
    a = torch.tensor(sd_alphas_cumprod())
    train_sigmas = ((1 - a) / a).sqrt()
    sig = sampling.ddim_sigmas(train_sigmas, 10)
    assert sig.shape == (11,)
    assert torch.allclose(sig[0], train_sigmas[901].float()) and torch.allclose(sig[-1], train_sigmas[0].float())


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_step_matches_the_vp_ddim_update(eta):
    rng = np.random.default_rng(0)
    a = sd_alphas_cumprod()
    t, t_prev = 501, 481
    a_t, a_prev = a[t], a[t_prev]
    x0, eps, z = (rng.standard_normal((1, 4, 3, 3)) for _ in range(3))
    x_vp = np.sqrt(a_t) * x0 + np.sqrt(1 - a_t) * eps
    s = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
    want_vp = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - s**2) * eps + s * z  # Song et al. Eq. 12
    sigma, sigma_prev = np.sqrt((1 - a_t) / a_t), np.sqrt((1 - a_prev) / a_prev)
    x = torch.tensor(x_vp / np.sqrt(a_t))
    got = sampling.ddim_step(x, torch.tensor(x0), sigma, sigma_prev, eta, torch.tensor(z))
    np.testing.assert_allclose(got.numpy() * np.sqrt(a_prev), want_vp, atol=1e-10)


def test_eta_needs_noise_and_last_step_to_zero_is_x0():
    x, d = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"^eta > 0 needs noise$"):
        sampling.ddim_step(x, d, 1.0, 0.5, eta=0.3)
    assert torch.equal(sampling.ddim_step(x, d, 1.0, 0.0, eta=0.3), d)


def test_timesteps_at_the_edges_and_with_a_remainder():
    """k = T // steps, floored: 1000 // 3 = 333 gives [667, 334, 1]; steps = T takes every timestep."""
    assert sampling.ddim_timesteps(3) == [667, 334, 1]
    assert sampling.ddim_timesteps(4, 4) == [4, 3, 2, 1]
    with pytest.raises(ValueError, match=r"^steps must be between 1 and 4, got 5$"):
        sampling.ddim_timesteps(5, 4)


def test_sigmas_follow_the_tables_length():
    """A 500-entry sigma table: k = 500 // 5 = 100, timesteps 401, 301, 201, 101, 1, then sigma(0)."""
    table = torch.linspace(0.01, 10.0, 500, dtype=torch.float64)
    want = table[[401, 301, 201, 101, 1, 0]].float()
    assert torch.equal(sampling.ddim_sigmas(table, 5), want)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_step_keeps_float64_precision_for_python_float_sigmas(eta):
    """Plain Python floats for sigma (as ComfyUI passes them) are read in float64: a float32 rounding
    of 0.7 would move the result by ~1e-8, far above this tolerance."""
    rng = np.random.default_rng(1)
    x0, eps, z = (rng.standard_normal((1, 4, 2, 2)) for _ in range(3))
    sigma, sigma_next = 0.7, 0.3
    a, a_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    s = eta * np.sqrt((1 - a_next) / (1 - a)) * np.sqrt(1 - a / a_next)
    want = x0 + np.sqrt(1 - a_next - s**2) / np.sqrt(a_next) * eps + s / np.sqrt(a_next) * z
    got = sampling.ddim_step(torch.tensor(x0 + sigma * eps), torch.tensor(x0), sigma, sigma_next, eta, torch.tensor(z))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-13)
