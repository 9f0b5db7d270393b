"""Residual Reference Attention Patch: the concept's RRA layers read a reference photo while sampling."""

from __future__ import annotations

import logging

import torch

from ..eqdiff_core import rra
from ..eqdiff_core.concept import ConceptError
from .comfyui import latents, management, weights
from .comfyui.attention import CONTEXTS, WEIGHTS, ReferenceAttention, ReferenceSettings, reference_maps
from .comfyui.node_api import check_range, io, require_choices
from .comfyui.unet import attention_layers
from .concept import Concept


class EqDiffRRAPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffRRAPatch",
            display_name="Residual Reference Attention Patch",
            category="EqDiff",
            description="Patches the MODEL so that the self-attention layers the concept learned RRA for take "
            "details of the subject from a reference photo at every step (EqDiff Eq. 8-9). The reference goes "
            "through the same UNet once per step; its features are cached, so further runs with the same "
            "model, concept, reference and schedule skip it.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL, usually after Apply Concept."),
                Concept.Input("concept", tooltip="The concept whose RRA layers are used."),
                io.Image.Input("reference", tooltip="One photo of the subject (a batch of one)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the reference."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Scales the learned reference mask M^f; 0 turns RRA off."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="RRA acts from this point of the schedule (0 = the first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="... until this point (1 = the last step)."),
                io.Combo.Input("reference_noise", options=["clean", "noised"], default="clean",
                               tooltip="clean: the clean reference latent at the current step (the authors' "
                               "inference). noised: the reference noised to the step's level with seeded noise."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the reference noise (reference_noise = noised)."),
                io.Combo.Input("rows", options=["cond_uncond", "cond"], default="cond_uncond",
                               tooltip="cond_uncond: RRA in both CFG branches (the authors). cond: only in the "
                               "conditional branch."),
                io.Combo.Input("layers", options=list(rra.RRA_LAYER_SETS), default="middle+output",
                               tooltip="Which self-attention layers fuse the reference (only those the concept "
                               "has RRA weights for). The authors: middle+output."),
                io.Boolean.Input("cache", default=True,
                                 tooltip="Keep the reference features per step for later runs (GPU memory: about "
                                 "15 MB per step and reference row for SD1.5 at 512 px, at most 128 steps)."),
                io.Combo.Input("reference_contexts", options=list(CONTEXTS), default="per_branch",
                               tooltip="per_branch: a reference row per CFG branch, the conditional one reading the "
                               "reference text, the unconditional one the negative prompt (the authors, whose "
                               "negative is empty). shared: one row with the reference text for both (one row "
                               "less per step)."),
                io.Combo.Input("reference_weights", options=list(WEIGHTS), default="base",
                               tooltip="base: the reference pass sees the checkpoint without this concept's K/V "
                               "(the authors' frozen base UNet, as in training). model: the MODEL as it is."),
                io.Conditioning.Input("reference_conditioning", optional=True,
                                      tooltip="Text context of the reference pass; default: the concept's own "
                                      "(the class prompt it was trained with)."),
            ],
            outputs=[io.Model.Output("rra_model", display_name="model", tooltip="The MODEL with RRA.")],
        )

    @classmethod
    def validate_inputs(cls, start_percent, end_percent) -> bool | str:
        if start_percent is not None and end_percent is not None and start_percent > end_percent:
            return f"start_percent ({start_percent}) must not be after end_percent ({end_percent})"
        return check_range(cls, start_percent=start_percent, end_percent=end_percent)

    @classmethod
    def execute(cls, model, concept, reference, vae, strength, start_percent, end_percent, reference_noise,
                noise_seed, rows, layers, cache, reference_contexts="per_branch", reference_weights="base",
                reference_conditioning=None) -> io.NodeOutput:
        require_choices(cls, reference_noise=reference_noise, rows=rows, layers=layers,
                        reference_contexts=reference_contexts, reference_weights=reference_weights)
        open_keys, context = _rra_inputs(model, concept, reference, layers, reference_conditioning)
        if not open_keys or strength == 0.0:
            return io.NodeOutput(model)  # every gate closed or scaled to 0: RRA is exactly the identity
        latent = latents.encode(vae, reference)
        settings = ReferenceSettings(reference_noise, noise_seed, rows, strength, start_percent, end_percent, cache,
                                     reference_contexts, reference_weights)
        return io.NodeOutput(ReferenceAttention(concept, open_keys, latent, context, settings).patch(model))


def _rra_inputs(model, concept, reference, layers, reference_conditioning):
    """The concept's RRA layers in ``layers`` whose gate can open, and the reference pass's context;
    errors name the input to change."""
    if not concept.rra:
        raise ConceptError(f"concept '{concept.name}' has no RRA layers (it was trained with RRA off); "
                           f"leave out the RRA Patch for it.")
    weights.check_concept_fits(concept, model)
    blocks = rra.RRA_LAYER_SETS[layers]
    available = {layer.key for layer in attention_layers(model.get_model_object("diffusion_model"))}
    keys = sorted(k for k in concept.rra if k in available and k.split(".")[0] in blocks)
    if not keys:
        raise ConceptError(f"layers: concept '{concept.name}' has RRA layers only at "
                           f"{', '.join(sorted(concept.rra))}; none is in '{layers}'.")
    open_keys = [k for k in keys if not rra.gate_is_closed(concept.rra[k]["h_r.weight"], concept.rra[k]["h_r.bias"])]
    if len(open_keys) < len(keys):
        logging.info("EqDiff RRA: %d of %d layers of concept '%s' have a closed gate (untrained); they are "
                     "the base layers and are skipped", len(keys) - len(open_keys), len(keys), concept.name)
    if reference.shape[0] != 1:
        raise ValueError(f"reference: got a batch of {reference.shape[0]} images; connect one photo "
                         f"(Image From Batch picks one).")
    if min(reference.shape[1:3]) < 32:
        raise ValueError(f"reference: {reference.shape[2]}x{reference.shape[1]} px is too small; use the "
                         f"photo at 256 px or more.")
    if reference_conditioning is not None:
        context = reference_conditioning[0][0][:1]
    elif concept.reference_context is not None:
        context = concept.reference_context[None]
    else:
        raise ConceptError(f"concept '{concept.name}' holds no reference context; connect "
                           f"reference_conditioning (CLIP Text Encode of e.g. 'a photo of a dog').")
    return open_keys, context


class EqDiffReferenceMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffReferenceMaps",
            display_name="Reference Attention Maps",
            category="EqDiff",
            description="What RRA does on an image (the paper's Fig. 5): the image's latent is noised to one point "
            "of the schedule and denoised once with the concept's RRA layers, and their maps are kept. Outputs "
            "the learned reference mask M^f over the image (averaged over the RRA layers), the aggregated "
            "reference attention of Eq. 10 (per position of the image, the share of its attention on the "
            "reference subject; needs the reference mask) and the attention each part of the reference "
            "receives, weighted by M^f. The maps of the L_ra layers (16x16 at 512 px) are used.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL with the concept applied (Apply Concept)."),
                Concept.Input("concept", tooltip="The concept whose RRA layers are inspected."),
                io.Image.Input("reference", tooltip="The reference photo (a batch of one)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE."),
                io.Conditioning.Input("positive", tooltip="The prompt the image was made with."),
                io.Latent.Input("latent", tooltip="The image to inspect, e.g. the sampler's output."),
                io.Float.Input("percent", default=0.5, min=0.01, max=0.99, step=0.01,
                               tooltip="Where in the schedule to look (0 = pure noise, 1 = the clean image)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the added noise."),
                io.Mask.Input("reference_mask", optional=True,
                              tooltip="The subject in the reference photo (e.g. Grounded Mask); needed for the "
                              "aggregated attention map."),
            ],
            outputs=[
                io.Image.Output("reference_mask_map", display_name="reference mask M^f",
                                tooltip="M^f over the image: where RRA takes the reference's features (white)."),
                io.Image.Output("aggregated_attention", display_name="aggregated attention",
                                tooltip="Share of each position's reference attention on the reference subject "
                                "(black without a reference mask)."),
                io.Image.Output("attention_on_reference", display_name="attention on reference",
                                tooltip="How much attention each part of the reference receives (normalised)."),
            ],
        )

    @classmethod
    def execute(cls, model, concept, reference, vae, positive, latent, percent, seed,
                reference_mask=None) -> io.NodeOutput:
        keys, context = _rra_inputs(model, concept, reference, "all", None)
        if not keys:
            raise ConceptError(f"concept '{concept.name}': every RRA gate is closed (untrained); there is "
                               f"nothing to show.")
        samples = latent["samples"]
        h, w = samples.shape[-2:]
        levels = {layer.key: layer.level for layer in attention_layers(model.get_model_object("diffusion_model"))}
        shown = rra.loss_layers(levels, keys) or keys
        ref_latent = latents.encode(vae, reference)
        maps, gates = reference_maps(model, concept, keys, ref_latent, context, samples, positive, percent, seed)
        gate = torch.stack([rra.token_grid(gates[k], h, w) for k in keys]).mean(0)
        attention = torch.stack([maps[k] for k in shown]).mean(0).float()
        # the reference is resized to the image's latent size for its pass, so both share one grid
        if reference_mask is not None:
            m = torch.nn.functional.interpolate(reference_mask.reshape(1, 1, *reference_mask.shape[-2:]).float(),
                                                size=rra.grid_size(attention.shape[2], h, w), mode="area")
            share = rra.subject_share(attention, m.flatten(1).to(attention.device).expand(attention.shape[0], -1))
        else:
            share = torch.zeros(attention.shape[:2], device=attention.device)
        mask_weights = torch.stack([gates[k] for k in shown]).mean(0).float()
        received = rra.received_attention(attention, mask_weights if float(mask_weights.sum()) > 0 else None)
        received = received / received.amax(dim=1, keepdim=True).clamp_min(1e-8)
        return io.NodeOutput(_as_image(gate, 8), _as_image(rra.token_grid(share, h, w), 8),
                             _as_image(rra.token_grid(received, h, w), 8))


def _as_image(values: torch.Tensor, upscale: int) -> torch.Tensor:
    """(B, h, w) in [0, 1] -> IMAGE (B, h*upscale, w*upscale, 3), grey levels."""
    big = torch.nn.functional.interpolate(values[:, None].float(), scale_factor=upscale, mode="nearest")
    return management.bchw_to_image(big.clamp(0, 1).expand(-1, 3, -1, -1))


NODES = [EqDiffRRAPatch, EqDiffReferenceMaps]
