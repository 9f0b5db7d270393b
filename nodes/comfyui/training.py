"""The training backend: eqdiff_core.training's DiffusionBackend over a ComfyUI MODEL, CLIP and VAE.

ComfyUI's weights are inference tensors that autograd cannot use, its modules may hold them merged
with weight patches or not (Dynamic VRAM applies patches on the fly), and the MODEL and CLIP the
user connected must not change. The backend therefore trains on private copies of the UNet and the
CLIP text encoder: the module structure copied, every weight computed from the patcher's base weights
and weight patches (nodes.comfyui.weights), and ComfyUI's casting turned off so the copies run as
plain torch modules. The concept's K/V deltas wrap the copy's cross-attention projections (off for
the reference pass, which sees the base weights; PureCC's extractor passes read its Stage-1 concept's
deltas instead), and RRA runs through the same attention patches as at inference. ICO's context
tokens enter the prompt as embedding tokens of the text encoder's input, as the concept token does.
"""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Iterable

import torch
import torch.nn.functional as F

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

from ...eqdiff_core import rra
from ...eqdiff_core import training as core
from . import latents, management, tokens
from .attention import STEP_KEY, ReferenceFuser, ReferenceWriter, RRAAttention, StepState, TokenAttention
from .unet import attention_layers
from .weights import UNET_PREFIX, patched_weights, unet_shapes

NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm)
KV_WEIGHT = r"attn2\.to_[kv]\.weight$"
SELF_KV_WEIGHT = r"attn1\.to_[kv]\.weight$"


# -- private trainable copies --------------------------------------------------------------------
def _structure(module: torch.nn.Module) -> torch.nn.Module:
    """The module tree without its weights. Each module is copied shallowly, so attributes ComfyUI keeps
    on its layers while it manages them are shared, not duplicated; ComfyUI's casting is switched off,
    so the copy's layers run as the plain torch layers they subclass."""
    copied = copy.copy(module)
    copied._parameters = dict.fromkeys(module._parameters)
    copied._buffers = {k: None if b is None else b.detach().clone() for k, b in module._buffers.items()}
    copied._modules = {k: None if m is None else _structure(m) for k, m in module._modules.items()}
    if hasattr(copied, "comfy_cast_weights"):
        # what Dynamic VRAM's loader attaches (a slot in its VRAM bar, pinned host buffers, on-the-fly
        # patches) stays with ComfyUI's module: the copy neither uses nor holds it
        for name in [n for n in vars(copied) if n.startswith(("_v", "_pin")) or n.endswith("_lowvram_function")]:
            delattr(copied, name)
        copied.comfy_cast_weights = False
        copied.weight_function, copied.bias_function = [], []
    return copied


def trainable_copy(module: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                   dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of ``module`` holding ``weights`` ((state-dict key, tensor) pairs, on the device they
    come on), floating-point ones in ``dtype`` (normalisation layers in float32)."""
    with torch.inference_mode(False):
        copied = _structure(module)
        for key, value in weights:
            path, _, name = key.rpartition(".")
            owner = copied.get_submodule(path) if path else copied
            if value.is_floating_point():  # norms stay in float32: autocast runs them in float32
                value = value.to(torch.float32 if isinstance(owner, NORMS) else dtype)
            if name in owner._parameters:
                owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
            elif name in owner._buffers:
                owner._buffers[name] = value
        missing = [f"{n}.{p}" if n else p for n, m in copied.named_modules() for p, v in m._parameters.items()
                   if v is None and getattr(module.get_submodule(n), p, None) is not None]
        if missing:
            raise RuntimeError(f"the model's weights lack {', '.join(missing[:5])}; it cannot be trained")
        return copied.eval()


def _out_of_place_clip_layer(self, x, mask=None, optimized_attention=None):
    """ComfyUI's CLIPLayer.forward without its in-place residual adds, which autograd rejects."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def _checkpointed(forward):
    """Gradient checkpointing of one UNet layer. ComfyUI mutates transformer_options while it walks the
    UNet, so the recomputation gets the options as they were at the first call."""
    import torch.utils.checkpoint

    def run(*args, **kwargs):
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


class DeltaProjection(torch.nn.Module):
    """A cross-attention K or V projection of the trainable copy: x (W + delta)^T with the delta
    ``owner.kv_delta(key)`` of the pass (None: the base weights).

    ``detach_start_token``: the start token's keys and values pass no gradient, as Custom Diffusion's
    (and the authors') processor does (``detach[:, :1]``)."""

    def __init__(self, base: torch.nn.Module, owner, key: str, detach_start_token: bool):
        super().__init__()
        self.base, self.owner, self.key, self.detach_start_token = base, owner, key, detach_start_token

    def forward(self, x):
        weight = self.base.weight
        delta = self.owner.kv_delta(self.key)
        if delta is not None:
            weight = weight + delta.to(weight.dtype)
        out = F.linear(x, weight, self.base.bias)
        if self.detach_start_token and delta is not None:
            out = torch.cat([out[:, :1].detach(), out[:, 1:]], dim=1)
        return out


class _TrainingRRA:
    """The owner the RRA patches ask for their layer while training: the trainable ones, uncast
    (autocast casts inside)."""

    strength = 1.0

    def __init__(self, params):
        self.params = params

    def layer(self, key, like):
        return self.params.rra_layer(key)


# -- the backend ---------------------------------------------------------------------------------
class TrainingBackend:
    """eqdiff_core.training.DiffusionBackend over a ComfyUI MODEL and CLIP (see the module doc)."""

    def __init__(self, model, clip, params, settings, *, token: str, class_word: str, dtype: torch.dtype,
                 gradient_checkpointing: bool, extractor=None):
        """``extractor``: PureCC's Stage-1 concept (its K/V deltas serve the extractor passes)."""
        device = management.compute_device()
        self.device, self.dtype, self.params, self.settings = device, dtype, params, settings
        self.autocast = dtype != torch.float32
        self.kv_weights = "trained"  # whose K/V deltas the UNet adds: trained, base (none) or extractor
        self.extractor_kv = {}
        if extractor is not None and settings.purecc_extractor == "concept":
            self.extractor_kv = {k: v.to(device, torch.float32) for k, v in extractor.kv_deltas.items()}
        diffusion_model = model.get_model_object("diffusion_model")
        self.unet = trainable_copy(diffusion_model, patched_weights(model, UNET_PREFIX, device), dtype)
        with torch.inference_mode(False):
            for name in dict.fromkeys([*params.kv_keys, *self.extractor_kv]):
                path = name[len(UNET_PREFIX):-len(".weight")]
                parent, _, child = path.rpartition(".")
                owner = self.unet.get_submodule(parent)
                setattr(owner, child, DeltaProjection(getattr(owner, child), self, name, settings.detach_start_token))
        if gradient_checkpointing:
            for module in self.unet.modules():
                if isinstance(module, (ResBlock, SpatialTransformer)):
                    module.forward = _checkpointed(module.forward)
        sigmas = model.get_model_object("model_sampling").sigmas.float()
        self.alphas_cumprod = (1.0 / (1.0 + sigmas**2)).to(device)

        layers = {layer.key: layer for layer in attention_layers(diffusion_model)}
        levels = {key: layer.level for key, layer in layers.items()}
        self.ra_layers = frozenset(rra.loss_layers(levels, params.rra_keys))
        ca_level = levels[next(iter(self.ra_layers))] if self.ra_layers else max(levels.values())
        self.token_layers = [layers[k] for k, lvl in levels.items() if lvl == ca_level and not k.startswith("middle")]
        self.rra_owner = _TrainingRRA(params)
        self.rra_patches = {layers[k].patch_key: RRAAttention(self.rra_owner, k) for k in params.rra_keys}

        self.text = self._text_encoder(clip, dtype)
        prompt = settings.prompt_template.format(token=token, class_word=class_word)
        self.instance_tokens, self.placeholder_index = self._instance_tokens(clip, prompt, token)
        if settings.ico_contexts:  # the photos' prompts are ICO's: the cross-attention loss reads its placeholder
            self.ico_tokens, self.ico_positions = self._ico_tokens(clip, token, class_word)
            self.placeholder_index = self.ico_positions[settings.ico_prefix_tokens]
        with torch.inference_mode(False), torch.no_grad():
            if settings.purecc:
                self._purecc_contexts = (self.encode(clip, settings.purecc_base_prompt.format(class_word=class_word)),
                                         self.encode(clip, ""))
            self._class_context = self.encode(clip, settings.class_prompt.format(class_word=class_word))
            if settings.reference_prompt == "instance":  # the placeholder keeps its initial, untrained row
                self._reference_context = self.instance_context(tokens.vocabulary_row(clip, settings.init_token)[None])
            else:
                self._reference_context = self._class_context
            self.inference_reference_context = self.encode(
                clip, settings.inference_reference_prompt.format(class_word=class_word))[0].cpu()

    def set_parameters(self, params) -> None:
        """Train other parameters of the same shapes with this backend."""
        self.params = self.rra_owner.params = params

    def _text_encoder(self, clip, dtype):
        text_model = getattr(clip.cond_stage_model, clip.cond_stage_model.clip)
        prefix = clip.cond_stage_model.clip + "."
        encoder = trainable_copy(text_model, patched_weights(clip.patcher, prefix, self.device), dtype)
        if clip.layer_idx is not None:
            encoder.set_clip_options({"layer": clip.layer_idx})
        for layer in encoder.transformer.text_model.encoder.layers:
            layer.forward = _out_of_place_clip_layer.__get__(layer)
        return encoder

    @staticmethod
    def _instance_tokens(clip, prompt: str, token: str):
        marker = torch.zeros(tokens.text_width(clip))
        rows = tokens.prompt_tokens(clip, prompt, {token: marker})
        if len(rows) != 1:
            raise ValueError(f"prompt_template: '{prompt}' is longer than one 77-token chunk; shorten it")
        where = [i for i, t in enumerate(rows[0]) if torch.is_tensor(t)]
        if len(where) != 1:
            raise ValueError(f"prompt_template: '{prompt}' must contain the token exactly once")
        return rows[0], where[0]

    def _ico_tokens(self, clip, token: str, class_word: str):
        """ICO's prompt (DCI/ICO Eq. 2) as one token row with a tensor slot per context and at the
        placeholder, and the slots' positions (prefix contexts, placeholder, suffix contexts)."""
        slot = "<eqdiff-ico-context>"
        m, n = self.settings.ico_prefix_tokens, self.settings.ico_suffix_tokens
        prompt = " ".join([slot] * m + [token, class_word] + [slot] * n)
        marker = torch.zeros(tokens.text_width(clip))
        rows = tokens.prompt_tokens(clip, prompt, {token: marker, slot: marker})
        if len(rows) != 1:
            raise ValueError(f"ico_prefix_tokens / ico_suffix_tokens: the ICO prompt '{prompt}' is longer than one "
                             f"77-token chunk; use fewer contexts or a shorter class_word")
        where = [i for i, t in enumerate(rows[0]) if torch.is_tensor(t)]
        if len(where) != m + 1 + n:
            raise ValueError(f"class_word: {class_word!r} holds {slot!r}, the ICO prompt's context slot; use plain "
                             f"words")
        return rows[0], where

    # -- DiffusionBackend ---------------------------------------------------------------------------
    def _autocast(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def encode(self, clip, prompt: str) -> torch.Tensor:
        """The text context (1, T, D) of a plain prompt, from the training copy of the text encoder (as
        CLIP Text Encode computes it, chunks of 77 tokens side by side)."""
        rows = tokens.prompt_tokens(clip, prompt, {})
        with self._autocast():
            z = self.text(rows)[0].float().to(self.device)
        return z.reshape(1, -1, z.shape[-1])

    def instance_context(self, embeddings):
        rows = [[e if torch.is_tensor(t) else t for t in self.instance_tokens] for e in embeddings]
        with self._autocast():
            return self.text(rows)[0].float().to(self.device)  # the text encoder may live on another device

    def ico_context(self, embeddings, contexts):
        slots = self.ico_positions
        rows = []
        for e, c in zip(embeddings, contexts):
            values = [*c[: self.settings.ico_prefix_tokens], e, *c[self.settings.ico_prefix_tokens:]]
            row = list(self.ico_tokens)
            for position, value in zip(slots, values):
                row[position] = value
            rows.append(row)
        with self._autocast():
            return self.text(rows)[0].float().to(self.device)

    def purecc_contexts(self):
        return self._purecc_contexts

    def class_context(self):
        return self._class_context

    def reference_context(self):
        return self._reference_context

    def _options(self, state: StepState) -> dict:
        patches = {"attn1_patch": [ReferenceWriter()], "attn1_output_patch": [ReferenceFuser()]}
        replace = {"attn1": dict(self.rra_patches)}
        if state.recorded_rows and self.settings.cross_attention_loss_weight > 0:
            replace["attn2"] = {layer.patch_key: TokenAttention(layer.key) for layer in self.token_layers}
        return {"patches": patches, "patches_replace": replace, STEP_KEY: state}

    def _unet(self, x, timesteps, context, state):
        with self._autocast():
            out = self.unet(x.to(self.dtype), timesteps=timesteps.float(), context=context.to(self.dtype),
                            transformer_options=self._options(state))
        return out.float()

    def kv_delta(self, key: str):
        """The K/V delta the current pass adds to ``key``'s weight (None: the base weight)."""
        if self.kv_weights == "trained":
            return self.params.kv_delta(key) if key in self.params.kv_keys else None
        if self.kv_weights == "extractor":
            return self.extractor_kv.get(key)
        return None

    @contextlib.contextmanager
    def _weights(self, which: str):
        self.kv_weights = which
        try:
            yield
        finally:
            self.kv_weights = "trained"

    def reference_features(self, x, timesteps, context):
        state = StepState(frozenset(self.params.rra_keys), None, 0, write=True)
        with self._weights("base"):
            self._unet(x, timesteps, context, state)
        return state.bank

    def frozen_prediction(self, x, timesteps, context, weights):
        state = StepState(frozenset(self.params.rra_keys), None, x.shape[0])  # no reference: RRA stays idle
        with self._weights(weights), torch.no_grad():
            return self._unet(x, timesteps, context, state)

    def predict(self, x, timesteps, context, reference, recorded_rows):
        state = StepState(frozenset(self.params.rra_keys), None, x.shape[0], bank=reference or {},
                          record=self.ra_layers if reference else frozenset(), recorded_rows=recorded_rows,
                          placeholder_index=self.placeholder_index)
        noise = self._unet(x, timesteps, context, state)
        ra = [state.reference_maps[k] for k in sorted(self.ra_layers) if k in state.reference_maps]
        token = [state.token_maps[k] for k in sorted(state.token_maps)]
        return core.StepOutput(noise, torch.stack(ra).mean(0) if ra else None,
                               torch.stack(token).mean(0) if token else None)


# -- the data and the parameters at step 0 -------------------------------------------------------
def _square_pixels(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> (B, 3, R, R) in [-1, 1] on the compute device (squashed to a square, as the
    authors do; crop upstream to keep the aspect ratio)."""
    x = management.image_to_bchw(images[..., :3].float())
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x * 2.0 - 1.0


def _unet_latents(model, vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, R, R) in [-1, 1] (any range: magnitude bands exceed 1) -> UNet-space latents (B, 4, R/8, R/8)."""
    return latents.to_unet_space(model, latents.encode(vae, ((pixels + 1.0) / 2.0).movedim(1, -1)))


def training_data(model, vae, images, masks, class_images, settings, resolution: int) -> core.TrainingData:
    """Everything the steps reuse: VAE latents of the photos and of their bands, the masks at latent
    size, the canvas latent and the class images' latents."""

    def band_latents(pixels):  # (B, 3, R, R) -> (3, B, 4, R/8, R/8): LOW, HIGH, ORIGINAL
        low, high = core.frequency_bands(pixels, settings)
        return torch.stack([_unet_latents(model, vae, low), _unet_latents(model, vae, high),
                            _unet_latents(model, vae, pixels)])

    with torch.inference_mode(False), torch.no_grad():
        pixels = _square_pixels(images, resolution)
        band = band_latents(pixels)
        size = tuple(band.shape[-2:])
        m = F.interpolate(masks[:, None].float().to(band.device), size=(resolution, resolution), mode="area")[:, 0]
        loss_masks = core.latent_mask(m, size, settings.dilate_iterations, settings.dilate_kernel)
        subject = core.latent_mask(m, size)
        canvas = _unet_latents(model, vae, torch.zeros_like(pixels[:1]))[0]
        prior = None
        if class_images is not None:
            prior = band_latents(_square_pixels(class_images, resolution)).transpose(0, 1)
        return core.TrainingData(band.clone(), loss_masks.clone(), subject.clone(), canvas.clone(),
                                 None if prior is None else prior.clone())


def initial_parameters(model, clip, settings, resume=None, photos: int = 0) -> core.ConceptParameters:
    """The trained tensors at step 0: both embeddings from ``settings.init_token``, zero K/V deltas,
    RRA layers whose reference projections start as the layer's K/V and whose H_r is zero, and with ICO
    the contexts of ``photos`` photos (``ico_contexts``). With a concept to resume from, its tensors
    (its ICO contexts when its training state kept them)."""
    if resume is not None:
        params = core.ConceptParameters.from_concept(resume)
        return _with_contexts(params, clip, settings, photos)
    diffusion_model = model.get_model_object("diffusion_model")
    kv = {}
    if settings.train_kv:
        kv = {k: torch.zeros(shape) for k, shape in unet_shapes(model).items() if re.search(KV_WEIGHT, k)}
    layers = {}
    if settings.train_rra:
        weights = dict(patched_weights(model, UNET_PREFIX, keep=lambda k: re.search(SELF_KV_WEIGHT, k)))
        wanted = rra.RRA_LAYER_SETS[settings.rra_layers]
        for layer in attention_layers(diffusion_model):
            if layer.block in wanted:
                layers[layer.key] = rra.RRALayer.from_self_attention(weights[f"{layer.prefix}.attn1.to_k.weight"],
                                                                     weights[f"{layer.prefix}.attn1.to_v.weight"])
    init = tokens.vocabulary_row(clip, settings.init_token)
    with torch.inference_mode(False):
        return _with_contexts(core.ConceptParameters(init, init, kv, layers), clip, settings, photos)


def initial_contexts(clip, settings, photos: int) -> torch.Tensor:
    """ICO's contexts at step 0, (3, photos, M + L, D): the prefix as the last M tokens of
    ``ico_prefix_init`` (the first repeated when it has fewer), the suffix as the first L of
    ``ico_suffix_init`` (the last repeated), the same for every branch and photo (the DCI/ICO code starts
    every image's contexts from "a photo of a" and ". .")."""
    m, n = settings.ico_prefix_tokens, settings.ico_suffix_tokens
    parts = []
    if m:
        prefix = tokens.text_rows(clip, settings.ico_prefix_init)
        parts.append(torch.cat([prefix[:1].expand(max(0, m - len(prefix)), -1), prefix[-m:]]))
    if n:
        suffix = tokens.text_rows(clip, settings.ico_suffix_init)
        parts.append(torch.cat([suffix[:n], suffix[-1:].expand(max(0, n - len(suffix)), -1)]))
    return torch.cat(parts)[None, None].expand(3, photos, -1, -1).clone()


def _with_contexts(params: core.ConceptParameters, clip, settings, photos: int) -> core.ConceptParameters:
    """``params`` with ICO's contexts as the settings want them: none when ICO is off, the resumed ones when
    they fit, fresh ones otherwise."""
    want = settings.ico_contexts
    if not want:
        params.contexts = None
        return params
    if photos < 1:
        raise ValueError("ICO needs the number of photos to make their contexts")
    kept = params.contexts
    if kept is None or tuple(kept.shape[1:3]) != (photos, want):
        if kept is not None:
            raise ValueError(f"resume_from: its ICO contexts are for {kept.shape[1]} photos and {kept.shape[2]} "
                             f"tokens, this run has {photos} photos and ico_prefix_tokens + ico_suffix_tokens = "
                             f"{want}; resume with the same photos and ICO settings")
        with torch.inference_mode(False):
            params.contexts = torch.nn.Parameter(initial_contexts(clip, settings, photos))
    return params
