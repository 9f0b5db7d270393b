"""Residual Reference Attention Patch: the concept's RRA layers read a reference photo while sampling."""

from __future__ import annotations

from comfy_api.latest import io

import logging

from ..eqdiff_core.concept import ConceptError
from ..eqdiff_core.rra import RRA_LAYER_SETS as LAYER_SETS
from ..eqdiff_core.rra import gate_is_closed
from .concept import Concept
from .glue import ReferenceAttention, ReferenceSettings, attention_layers, check_choices, check_concept_fits


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
                io.Combo.Input("layers", options=list(LAYER_SETS), default="middle+output",
                               tooltip="Which self-attention layers fuse the reference (only those the concept "
                               "has RRA weights for). The authors: middle+output."),
                io.Boolean.Input("cache", default=True,
                                 tooltip="Keep the reference features per step for later runs (GPU memory: about "
                                 "15 MB per step for SD1.5 at 512 px, at most 128 steps)."),
                io.Conditioning.Input("reference_conditioning", optional=True,
                                      tooltip="Text context of the reference pass; default: the concept's own "
                                      "(the class prompt it was trained with)."),
            ],
            outputs=[io.Model.Output("rra_model", display_name="model", tooltip="The MODEL with RRA.")],
        )

    @classmethod
    def validate_inputs(cls, reference_noise, rows, layers, start_percent, end_percent) -> bool | str:
        if start_percent is not None and end_percent is not None and start_percent > end_percent:
            return f"start_percent ({start_percent}) must not be after end_percent ({end_percent})"
        return check_choices(cls, reference_noise=reference_noise, rows=rows, layers=layers)

    @classmethod
    def execute(cls, model, concept, reference, vae, strength, start_percent, end_percent, reference_noise,
                noise_seed, rows, layers, cache, reference_conditioning=None) -> io.NodeOutput:
        if not concept.rra:
            raise ConceptError(f"concept '{concept.name}' has no RRA layers (it was trained with RRA off); "
                               f"leave out the RRA Patch for it.")
        check_concept_fits(concept, model)
        blocks = LAYER_SETS[layers]
        available = {layer.key for layer in attention_layers(model.get_model_object("diffusion_model"))}
        keys = sorted(k for k in concept.rra if k in available and k.split(".")[0] in blocks)
        if not keys:
            raise ConceptError(f"layers: concept '{concept.name}' has RRA layers only at "
                               f"{', '.join(sorted(concept.rra))}; none is in '{layers}'.")
        open_keys = [k for k in keys if not gate_is_closed(concept.rra[k]["h_r.weight"], concept.rra[k]["h_r.bias"])]
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
        if not open_keys:
            return io.NodeOutput(model)  # every gate closed: RRA is exactly the identity, no reference pass
        latent = vae.encode(reference[:, :, :, :3])
        settings = ReferenceSettings(reference_noise, noise_seed, rows, strength, start_percent, end_percent, cache)
        return io.NodeOutput(ReferenceAttention(concept, open_keys, latent, context, settings).patch(model))


NODES = [EqDiffRRAPatch]
