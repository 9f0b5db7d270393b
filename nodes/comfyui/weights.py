"""Weight patches on a MODEL, and the weights a MODEL computes with.

A concept's cross-attention K/V deltas go on a MODEL as ComfyUI "diff" weight patches, which add to
LoRAs and other patches on the same weights. The weights a MODEL computes with are its base weights
with its weight patches applied; ComfyUI merges them into the modules on some releases and devices
and applies them on the fly on others (Dynamic VRAM), so they are computed here from the patcher's
base weights and patches, whatever the modules hold.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator

import torch

import comfy.lora

from ...eqdiff_core import concept as concept_io
from .unet import attention_layers

UNET_PREFIX = "diffusion_model."


CONCEPT_STRENGTHS = "eqdiff_concept_strengths"  # model_options["transformer_options"]: {fingerprint: strength}


def add_concept(model, concept: concept_io.Concept, strength: float):
    """A clone of MODEL with the concept's K/V deltas added as weight patches x strength; the strength
    is recorded in the MODEL's options, where the RRA Patch finds what to take off for its reference
    pass."""
    patched = model.clone()
    patched.add_patches({key: (delta,) for key, delta in concept.kv_deltas.items()}, strength)  # 1-tuple: "diff"
    options = patched.model_options["transformer_options"]
    strengths = dict(options.get(CONCEPT_STRENGTHS, {}))
    strengths[concept.fingerprint()] = strengths.get(concept.fingerprint(), 0.0) + strength
    options[CONCEPT_STRENGTHS] = strengths
    return patched


def concept_strength(model, concept: concept_io.Concept) -> float:
    """The strength at which the concept's K/V deltas are on this MODEL (0: not applied)."""
    return model.model_options["transformer_options"].get(CONCEPT_STRENGTHS, {}).get(concept.fingerprint(), 0.0)


def patched_weights(patcher, prefix: str, device="cpu", dtype: torch.dtype = torch.float32,
                    keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key without ``prefix``, weight) for each weight of a ModelPatcher's module (those ``keep``
    accepts), its weight patches applied, in ``dtype`` on ``device``: what the patcher's model computes
    with, however ComfyUI holds the weights. One weight at a time, so no second model is held."""
    for key, (base, *patches) in patcher.get_key_patches(prefix).items():
        name = key[len(prefix):]
        if keep is not None and not keep(name):
            continue
        weight, convert = base
        w = convert(weight.detach().to(device, torch.float32, copy=True), inplace=True)
        if patches:
            w = comfy.lora.calculate_weight(patches, w, key)
        for function in patcher.weight_wrapper_patches.get(key, []):
            w = function(w)
        yield name, w.to(dtype)


def unet_shapes(model) -> dict[str, tuple[int, ...]]:
    """{``diffusion_model.<key>``: shape} of the MODEL's UNet weights."""
    return {k: tuple(v.shape) for k, v in model.model_state_dict(UNET_PREFIX).items()}


def fingerprint(model) -> str:
    """A cheap digest of the weights MODEL computes with (a strided sample of each, its weight patches
    applied), to tell models apart: another checkpoint, LoRA or concept gives another digest."""
    entries = model.get_key_patches(UNET_PREFIX)
    patched = {k for k, (_, *patches) in entries.items() if patches}
    computed = dict(patched_weights(model, UNET_PREFIX, keep=lambda k: UNET_PREFIX + k in patched))
    return _digest({k[len(UNET_PREFIX):]: computed.get(k[len(UNET_PREFIX):], base[0]) for k, (base, *_) in entries.items()})


def _digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key, weight in sorted(weights.items()):
        flat = weight.detach().flatten()
        h.update(f"{key}{tuple(weight.shape)}".encode())
        h.update(flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def base_fingerprint(model) -> str:
    """The same digest of the UNet's base weights (before any weight patch), to tell base models apart."""
    return _digest({k[len(UNET_PREFIX):]: base[0] for k, (base, *_) in model.get_key_patches(UNET_PREFIX).items()})


def check_concept_fits(concept: concept_io.Concept, model, clip=None) -> None:
    """Raise ConceptError when the concept's tensors do not match this MODEL (and CLIP)."""
    from .tokens import text_width

    dims = {layer.key: layer.dim for layer in attention_layers(model.get_model_object("diffusion_model"))}
    token_dim = concept.token_lf.shape[0] if clip is None else text_width(clip)
    concept_io.check_fits(concept, token_dim, unet_shapes(model), dims, model_name="this checkpoint")
