"""Guiders: the DCI guider, a ``comfy.samplers.CFGGuider`` with an auxiliary branch on a latent of its own.

Inside the DCI window one ``calc_cond_batch`` call evaluates the conditions [positive, negative,
auxiliary] (plus [negative] on the auxiliary latent when the unconditional is separate), so ComfyUI
batches them into one UNet call and every cond feature (hooks, ControlNet, area checks, wrappers) stays
ComfyUI's own. ``calc_cond_batch`` tags each chunk of the batch with the index of its condition in that
list (``cond_or_uncond``); an APPLY_MODEL wrapper puts the auxiliary latent into the chunks of index 2
and 3, and an attn2 replace on every cross-attention layer applies DBIM to the concept chunk (index 0)
from the auxiliary chunk (index 2). Outside the window the guider is CFGGuider's ``predict_noise``.

The attn2 replace chains the replace that was on each layer before (another pack's, or RRA's base-weight
correction): that one computes the output of every row, DBIM then mixes the concept rows. The RRA Patch
treats only the cond and uncond chunks as targets, so RRA acts on the concept branch, not the auxiliary.

State: ``DCISettings`` (what the node set, shared by runs), ``DCIRun`` (one sampling run: the auxiliary
latent and the recorded weights, made by ``sample`` and put into a copy of the guider's options) and
``DCIStep`` (one evaluation, in transformer_options).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
from comfy.ldm.modules import attention as comfy_attention

from ...eqdiff_core import dci, rra
from ...eqdiff_core.sampling import ddim_step
from .attention import RunLog
from .unet import attention_layers

STEP_KEY = "eqdiff_dci"         # transformer_options: this evaluation's DCIStep
RUN_KEY = "eqdiff_dci_run"      # transformer_options: this run's DCIRun
WRAPPER_KEY = "eqdiff_dci"
CONCEPT, UNCOND, AUX, AUX_UNCOND = 0, 1, 2, 3   # indices in the calc_cond_batch list = cond_or_uncond values
CONTEXT_TOKENS = 77
UNCOND_MODES = ("shared", "separate")
AUX_INITS = ("independent", "same_noise")


@dataclass(frozen=True)
class DCISettings:
    lam: float
    fraction: float
    cfg: float
    concept_columns: tuple[int, ...]   # among the real tokens of P (0 = the first word)
    concept_length: int
    aux_columns: tuple[int, ...]       # the auxiliary noun among the real tokens of P_a
    aux_length: int
    uncond: str = "shared"             # "shared": the code's default, e_u of the concept latent for both
    aux_init: str = "independent"      # "independent": fresh noise (the code); "same_noise": x_a = x_c
    aux_seed: int = 0


@dataclass
class DCIRun:
    """One sampling run: the initial noise, the auxiliary latent and the integration weights recorded."""

    noise: torch.Tensor
    x_aux: torch.Tensor | None = None
    denoised_aux: torch.Tensor | None = None
    sigma_aux: float | None = None
    window_evaluations: int = 0
    latent_size: tuple[int, int] = (0, 0)
    weights: dict = field(default_factory=dict)   # layer -> sum over window evaluations of w_a (N,), batch item 0
    counts: dict = field(default_factory=dict)    # layer -> evaluations summed

    def aux_at(self, x: torch.Tensor, sigma: float, settings: DCISettings, sigma_max: float) -> torch.Tensor:
        """The auxiliary latent at ``sigma``: made from the concept latent at the run's first evaluation, then
        moved by DDIM (eta 0) from the last evaluation's prediction, so with a sampler that evaluates once
        per step (DDIM, Euler) it follows the DDIM trajectory over the schedule."""
        if self.x_aux is None:
            self.x_aux = x.clone()
            if settings.aux_init == "independent":
                noise = self.noise.to(x.device, x.dtype)
                aux_noise = torch.randn(noise.shape, generator=torch.Generator("cpu").manual_seed(settings.aux_seed))
                self.x_aux += noise_scaling(sigma, aux_noise.to(x.device, x.dtype) - noise, sigma_max)
        elif sigma != self.sigma_aux:
            self.x_aux = ddim_step(self.x_aux, self.denoised_aux, self.sigma_aux, sigma)
        self.sigma_aux = sigma
        return self.x_aux

    def record(self, key: str, w_aux: torch.Tensor) -> None:
        self.weights[key] = self.weights.get(key, 0) + w_aux.detach().float().cpu()
        self.counts[key] = self.counts.get(key, 0) + 1

    def mean_weights(self) -> dict:
        """layer -> mean w_a over the window's evaluations and the heads, (N,)."""
        return {k: v / self.counts[k] for k, v in self.weights.items()}


def noise_scaling(sigma: float, noise: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """What KSAMPLER adds to the latent at the first sigma: noise x sqrt(1 + sigma^2) at the schedule's top
    (``max_denoise``), noise x sigma below it (EPS models)."""
    max_denoise = math.isclose(sigma_max, sigma, rel_tol=1e-05) or sigma > sigma_max
    return noise * (math.sqrt(1.0 + sigma * sigma) if max_denoise else sigma)


@dataclass
class DCIStep:
    settings: DCISettings
    run: DCIRun
    x_aux: torch.Tensor


def _chunk_rows(chunks: list, value: int, per_chunk: int) -> slice:
    start = chunks.index(value) * per_chunk
    return slice(start, start + per_chunk)


class IntegrationAttention:
    """attn2 replace: the layer's cross-attention (``inner``'s, when another replace was there), then DBIM
    on the concept rows when the batch holds the concept and auxiliary chunks of a DCI step."""

    def __init__(self, key: str, inner=None):
        self.key, self.inner = key, inner

    def __deepcopy__(self, memo):  # shared by the clones of a MODEL, like the RRA patches
        return self

    def to(self, device_or_dtype):
        return self

    def __call__(self, q, k, v, extra_options):
        if self.inner is not None:
            out = self.inner(q, k, v, extra_options)
        else:
            out = comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                      attn_precision=extra_options.get("attn_precision"),
                                                      transformer_options=extra_options)
        step = extra_options.get(STEP_KEY)
        chunks = extra_options.get("cond_or_uncond") or []
        if step is None or CONCEPT not in chunks or AUX not in chunks:
            return out
        s = step.settings
        heads, per_chunk = extra_options["n_heads"], q.shape[0] // len(chunks)
        rows_c, rows_a = _chunk_rows(chunks, CONCEPT, per_chunk), _chunk_rows(chunks, AUX, per_chunk)
        probs_c, probs_a = (_fold(rra.attention_probs(q[r].float(), k[r].float(), heads).flatten(0, 1))
                            for r in (rows_c, rows_a))
        w_c, w_a = dci.integration_weights(probs_c, probs_a, list(s.concept_columns), s.concept_length,
                                           list(s.aux_columns), s.aux_length, s.lam)
        n, width = out.shape[1], out.shape[2]
        split = lambda t: t.reshape(per_chunk, n, heads, width // heads).transpose(1, 2).flatten(0, 1)  # noqa: E731
        mixed = dci.integrate(split(out[rows_c]), split(out[rows_a]), w_c, w_a)
        out = out.clone()
        out[rows_c] = mixed.reshape(per_chunk, heads, n, width // heads).transpose(1, 2).reshape(per_chunk, n, width)
        step.run.record(self.key, w_a.reshape(per_chunk, heads, n)[0].mean(0))
        return out


def _fold(probs: torch.Tensor) -> torch.Tensor:
    """(BH, N, r * 77) -> (BH, N, 77): a context repeated r times to a common length (ComfyUI's cond_cat
    does so when the negative prompt is longer) spreads each token's attention over its copies."""
    if probs.shape[-1] % CONTEXT_TOKENS:
        raise ValueError(f"DCI: a cross-attention context of {probs.shape[-1]} tokens is not whole CLIP rows")
    return probs.reshape(*probs.shape[:2], -1, CONTEXT_TOKENS).sum(dim=2)


def _apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    """APPLY_MODEL wrapper: the auxiliary chunks of a DCI step get the auxiliary latent."""
    step = transformer_options.get(STEP_KEY)
    chunks = transformer_options.get("cond_or_uncond") or []
    if step is not None and (AUX in chunks or AUX_UNCOND in chunks):
        per_chunk = x.shape[0] // len(chunks)
        if step.x_aux.shape[0] != per_chunk or step.x_aux.shape[2:] != x.shape[2:]:
            raise ValueError("DCI Guider: a condition covers part of the latent (area or mask conditioning); "
                             "DCI needs whole-image conditions")
        x = x.clone()
        for value in (AUX, AUX_UNCOND):
            if value in chunks:
                x[_chunk_rows(chunks, value, per_chunk)] = step.x_aux.to(x.dtype)
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


class DCIGuider(comfy.samplers.CFGGuider):
    """CFG outside the DCI window; inside it the 3-row (or 4-row) DCI step (module doc)."""

    def __init__(self, model_patcher, settings: DCISettings):
        super().__init__(model_patcher)
        self.settings = settings
        self.log = RunLog()
        self.set_cfg(settings.cfg)

    def set_conds(self, positive, negative, auxiliary=None):
        conds = {"positive": positive, "negative": negative}
        if auxiliary is not None:
            conds["auxiliary"] = auxiliary
        self.inner_set_conds(conds)

    def sample(self, noise, latent_image, *args, **kwargs):
        original = self.model_options
        self.model_options = comfy.model_patcher.create_model_options_clone(original)
        run = DCIRun(noise, latent_size=tuple(latent_image.shape[-2:]))
        self.model_options["transformer_options"][RUN_KEY] = run
        try:
            return super().sample(noise, latent_image, *args, **kwargs)
        finally:
            self.model_options = original
            self.log.runs.append(run)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        s = self.settings
        model_sampling = self.inner_model.model_sampling
        if not dci.in_window(float(model_sampling.timestep(timestep[:1].float())), s.fraction):
            return super().predict_noise(x, timestep, model_options, seed)
        run = model_options["transformer_options"][RUN_KEY]
        sigma = float(timestep[0])
        x_aux = run.aux_at(x, sigma, s, float(model_sampling.sigma_max))
        options = dict(model_options)
        options["transformer_options"] = dict(model_options["transformer_options"])
        options["transformer_options"][STEP_KEY] = DCIStep(s, run, x_aux)
        positive, negative = self.conds.get("positive"), self.conds.get("negative")
        conds = [positive, negative, self.conds["auxiliary"]] + ([negative] if s.uncond == "separate" else [])
        integrated = sum(run.counts.values())
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, options)
        if sum(run.counts.values()) == integrated:
            logging.warning("DCI Guider: DBIM was not applied at sigma %.4g: the concept and auxiliary rows ran in "
                            "separate UNet calls (ComfyUI splits a batch when memory is short), or a node after the "
                            "DCI Guider replaced the cross-attention", sigma)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out[:2] = fn({"conds": conds[:2], "conds_out": out[:2], "cond_scale": s.cfg, "timestep": timestep,
                          "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        denoised = comfy.samplers.cfg_function(self.inner_model, out[0], out[1], s.cfg, x, timestep,
                                               model_options=model_options, cond=positive, uncond=negative)
        eps_uncond = (x - out[1]) / sigma if s.uncond == "shared" else (x_aux - out[3]) / sigma
        run.denoised_aux = dci.auxiliary_denoised(x_aux, out[2], eps_uncond, sigma, s.cfg)
        run.window_evaluations += 1
        return denoised


def dci_guider(model, positive, negative, auxiliary, settings: DCISettings) -> DCIGuider:
    """A DCIGuider over a clone of MODEL whose cross-attention layers carry the DBIM replace (each chaining
    the replace that was there) and whose APPLY_MODEL carries the auxiliary-latent wrapper."""
    patched = model.clone()
    replaced = model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    for layer in attention_layers(model.get_model_object("diffusion_model")):
        # ComfyUI looks a replace up by (block, number, index), then by (block, number)
        inner = replaced.get(layer.patch_key, replaced.get(layer.patch_key[:2]))
        patched.set_model_attn2_replace(IntegrationAttention(layer.key, inner), *layer.patch_key)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model)
    guider = DCIGuider(patched, settings)
    guider.set_conds(positive, negative, auxiliary)
    return guider


def last_weights(guider) -> tuple[dict, tuple[int, int], int]:
    """The last run of a DCI guider: layer -> mean w_a (N,), the latent's (h, w) and the number of window
    evaluations."""
    if not isinstance(guider, DCIGuider):
        raise ValueError("guider: connect the DCI Guider's output")
    if not guider.log.runs:
        raise ValueError("guider: it has not sampled yet; connect the sampler's output latent to 'samples' so "
                         "this node runs after it")
    run = guider.log.last
    return run.mean_weights(), run.latent_size, run.window_evaluations


