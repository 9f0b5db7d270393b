"""The Equilibrated Sampler is DDIM: step by step against diffusers' DDIMScheduler on the tiny model."""

import torch
from diffusers import DDIMScheduler

import comfy.sample
import nodes
from comfy_runs import encode, progress_reports, run
from eqdiff_core.sampling import ddim_timesteps


def test_matches_diffusers_ddim_step_by_step(tiny):
    model, clip, _ = tiny
    steps, cfg, seed = 6, 4.0, 3
    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(clip, "a photo of a dog")[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        sampler, sigmas = nodes.NODE_CLASS_MAPPINGS["EqDiffSampler"].execute(model, steps, 0.0).result
        latent = torch.zeros(1, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, seed)
        xs = []
        out = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, pos, neg, latent, disable_pbar=True,
                                         seed=seed, callback=lambda i, x0, x, total: xs.append(x.clone()))
        xs.append(model.model.process_latent_in(out))  # sample_custom returns the VAE's latent scale

        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                  steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == ddim_timesteps(steps)
        alphas = scheduler.alphas_cumprod
        base = model.model
        train_sigmas = base.model_sampling.sigmas
        # ComfyUI's and diffusers' schedules are the same numbers
        assert torch.allclose(train_sigmas.double(), ((1 - alphas) / alphas).sqrt().double(), rtol=1e-4)

        def eps(x_vp, t):
            sigma = train_sigmas[t].reshape(1)
            x = x_vp / alphas[t].sqrt()
            cond = base.apply_model(x, sigma, c_crossattn=pos[0][0])
            uncond = base.apply_model(x, sigma, c_crossattn=neg[0][0])
            denoised = uncond + cfg * (cond - uncond)
            return (x - denoised) / sigma

        # diffusers starts from unscaled noise; compare the update rule from ComfyUI's start
        x_vp = xs[0] * alphas[scheduler.timesteps[0]].sqrt()
        for i, t in enumerate(scheduler.timesteps):
            ours = xs[i] * alphas[t].sqrt()
            assert torch.allclose(ours, x_vp, rtol=1e-4, atol=1e-4), f"step {i}: {(ours - x_vp).abs().max()}"
            x_vp = scheduler.step(eps(x_vp, t), t, x_vp, eta=0.0).prev_sample
        assert torch.allclose(xs[-1] * alphas[0].sqrt(), x_vp, rtol=1e-4, atol=1e-4)
        assert len(xs) == steps + 1


def sample_node(model, clip, latent, seed=3, steps=3, eta=0.0, cfg=4.0):
    """The Equilibrated Sampler node (nodes/sampler.py) on a LATENT dict."""
    return run("EqDiffEquilibratedSampler", model=model, positive=encode(clip, "a photo of a dog"),
               negative=encode(clip, ""), latent_image=latent, seed=seed, steps=steps, cfg=cfg, eta=eta)[0]


def test_the_sampler_node_is_sample_custom_with_its_sampler_cfg_and_eta(tiny):
    """Expected value: ComfyUI's sample_custom (what SamplerCustom runs) with the SAMPLER node's DDIM and
    schedule, the same seeded noise, cfg and eta."""
    import comfy.sample

    model, clip, _ = tiny
    latent = torch.zeros(1, 4, 8, 8)
    ours = sample_node(model, clip, {"samples": latent}, seed=5, eta=0.8, cfg=3.0)["samples"]
    sampler, sigmas = run("EqDiffSampler", model=model, steps=3, eta=0.8)
    with torch.inference_mode():
        expected = comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 5), 3.0, sampler, sigmas,
                                              encode(clip, "a photo of a dog"), encode(clip, ""), latent, seed=5)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, sample_node(model, clip, {"samples": latent}, seed=5, eta=0.0, cfg=3.0)["samples"])
    assert not torch.equal(ours, sample_node(model, clip, {"samples": latent}, seed=5, eta=0.8, cfg=4.0)["samples"])


def test_the_latent_is_sampled_as_ksampler_samples_it(tiny):
    """As KSampler: the noise of batch item i whatever the batch ('batch_index', as Latent From Batch
    sets it), the noise mask honoured (0: the input latent stays), eta > 0 repeatable by seed only."""
    model, clip, _ = tiny
    both = sample_node(model, clip, {"samples": torch.zeros(2, 4, 8, 8)})["samples"]
    second = sample_node(model, clip, {"samples": torch.zeros(1, 4, 8, 8), "batch_index": [1]})["samples"]
    # the same noise; a batch of 1 and of 2 may round differently (ComfyUI 0.33.0 does after other tests)
    assert torch.allclose(second[0], both[1], rtol=1e-4, atol=1e-4)
    assert (both[0] - both[1]).abs().max() > 1
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    free = sample_node(model, clip, {"samples": start})["samples"]
    kept = sample_node(model, clip, {"samples": start, "noise_mask": torch.zeros(1, 1, 64, 64)})
    assert "noise_mask" not in kept  # the output LATENT carries no mask on to the next sampler
    # masked out everywhere: the input latent, noised only to the schedule's last sigma (DDIM ends above 0)
    assert (kept["samples"] - start).abs().max() < (free - start).abs().max() / 4
    a, b = (sample_node(model, clip, {"samples": torch.zeros(1, 4, 8, 8)}, eta=0.8)["samples"] for _ in range(2))
    other = sample_node(model, clip, {"samples": torch.zeros(1, 4, 8, 8)}, seed=4, eta=0.8)["samples"]
    assert torch.equal(a, b) and not torch.equal(a, other)


def test_progress_is_reported_at_every_step(tiny):
    model, clip, _ = tiny
    with progress_reports() as reported:
        sample_node(model, clip, {"samples": torch.zeros(1, 4, 8, 8)}, steps=4)
    assert reported == [(1, 4), (2, 4), (3, 4), (4, 4)]
