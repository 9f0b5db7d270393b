"""The Equilibrated Sampler (DDIM, 50 steps, CFG 12.5) and the same schedule as SAMPLER + SIGMAS."""

from __future__ import annotations

from .comfyui import sampling
from .comfyui.node_api import io


def _steps_input():
    return io.Int.Input("steps", default=50, min=1, max=1000, tooltip="DDIM steps (the paper: 50).")


def _eta_input():
    return io.Float.Input("eta", default=0.0, min=0.0, max=1.0, step=0.01,
                          tooltip="DDIM eta: 0 = deterministic (the paper), 1 = DDPM-like noise.")


class EqDiffEquilibratedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffEquilibratedSampler",
            display_name="Equilibrated Sampler",
            category="EqDiff",
            description="Samples with DDIM as EqDiff does: the SD1.x DDIM schedule (timesteps 981 ... 1), eta 0, "
            "50 steps and CFG 12.5 by default (the authors' released test script uses CFG 7.5).",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL, usually after Apply Concept and the RRA Patch."),
                io.Conditioning.Input("positive", tooltip="The prompt with the concept's token."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (the paper: empty)."),
                io.Latent.Input("latent_image", tooltip="The start latent, e.g. Empty Latent Image 512x512."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise."),
                _steps_input(),
                io.Float.Input("cfg", default=12.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                _eta_input(),
            ],
            outputs=[io.Latent.Output("latent", display_name="latent", tooltip="The sampled latent.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, eta) -> io.NodeOutput:
        return io.NodeOutput(sampling.sample(model, positive, negative, latent_image, seed, sampling.ddim_sampler(eta),
                                             sampling.ddim_schedule(model, steps), cfg))


class EqDiffSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffSampler",
            display_name="Equilibrated Sampler (SAMPLER)",
            category="EqDiff",
            description="The Equilibrated Sampler's DDIM as a SAMPLER and its schedule as SIGMAS, for "
            "SamplerCustomAdvanced (with any guider and noise).",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL whose noise schedule the SIGMAS follow."),
                _steps_input(),
                _eta_input(),
            ],
            outputs=[
                io.Sampler.Output("sampler", display_name="sampler", tooltip="DDIM."),
                io.Sigmas.Output("sigmas", display_name="sigmas", tooltip="The SD1.x DDIM schedule."),
            ],
        )

    @classmethod
    def execute(cls, model, steps, eta) -> io.NodeOutput:
        return io.NodeOutput(sampling.ddim_sampler(eta), sampling.ddim_schedule(model, steps))


NODES = [EqDiffEquilibratedSampler, EqDiffSampler]
