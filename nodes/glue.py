"""ComfyUI glue shared by the node modules: tensor layouts, model folders, concepts on MODEL and
CLIP, Residual Reference Attention inside ComfyUI's sampler, and the DDIM sampler."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import folder_paths
from comfy.k_diffusion.sampling import default_noise_sampler
from comfy.ldm.modules import attention as comfy_attention

from ..eqdiff_core import concept as concept_io
from ..eqdiff_core import rra, sampling

CONCEPT_FOLDER = "eqdiff"
METRICS_FOLDER = "eqdiff_metrics"  # Hugging Face model folders for Customization Metrics (CLIP, DINO)
DINO_FOLDER = "grounding-dino"  # the folder names of the common Grounded-SAM packs
SAM_FOLDER = "sams"
RRA_KEY = "eqdiff_rra"


# -- layouts, folders, validation --------------------------------------------------------------
def image_to_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) in [0, 1] -> (B, C, H, W) on the compute device."""
    return image.to(comfy.model_management.get_torch_device()).movedim(-1, 1)


def bchw_to_image(tensor: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> ComfyUI IMAGE (B, H, W, C), float32 on the intermediate device."""
    return tensor.movedim(1, -1).to(comfy.model_management.intermediate_device(), torch.float32).contiguous()


def check_choices(node_cls, **values) -> bool | str:
    """``validate_inputs`` helper: every given combo value must be one of the node's options.

    ComfyUI 0.3.75 does not check V3 combo values itself. Linked inputs arrive as None and are
    checked when they run.
    """
    options = {inp.id: inp.options for inp in node_cls.define_schema().inputs if getattr(inp, "options", None)}
    for name, value in values.items():
        if value is not None and value not in options[name]:
            return f"{name}: {value!r} is not one of {', '.join(map(str, options[name]))}"
    return True


def register_model_folders() -> None:
    """``models/eqdiff`` for concept files and ``models/eqdiff_metrics`` for metric model folders, added
    beside any paths the user configured."""
    folder_paths.add_model_folder_path(CONCEPT_FOLDER, os.path.join(folder_paths.models_dir, CONCEPT_FOLDER))
    paths, _ = folder_paths.folder_names_and_paths[CONCEPT_FOLDER]
    folder_paths.folder_names_and_paths[CONCEPT_FOLDER] = (paths, {".safetensors"})
    folder_paths.add_model_folder_path(METRICS_FOLDER, os.path.join(folder_paths.models_dir, METRICS_FOLDER))
    register_grounding_folders()


def register_grounding_folders() -> None:
    """``models/grounding-dino`` and ``models/sams``, added beside the paths users or other packs
    configured; .pth and .safetensors join the extensions another pack may already have set."""
    for name in (DINO_FOLDER, SAM_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        paths, extensions = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(extensions) | {".pth", ".safetensors"})


def concept_path(name: str) -> str:
    """The full path of a concept file in the concept folders, or a ConceptError naming them."""
    path = folder_paths.get_full_path(CONCEPT_FOLDER, name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(CONCEPT_FOLDER))
        raise concept_io.ConceptError(f"'{name}' is not in {folders}; pick a file from the list, or put the "
                                      f".safetensors file written by EqDiff Save Concept there and refresh.")
    return path


# -- the UNet's attention layers ---------------------------------------------------------------
@dataclass(frozen=True)
class AttentionLayer:
    """A transformer block of the UNet: ComfyUI's patch key (block name, id, index) and its width."""

    block: str
    number: int
    index: int
    dim: int

    @property
    def key(self) -> str:
        return f"{self.block}.{self.number}.{self.index}"


def attention_layers(diffusion_model) -> list[AttentionLayer]:
    """Every BasicTransformerBlock of an SD1-style UNet, in ComfyUI's block numbering."""
    groups = (("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
              ("output", diffusion_model.output_blocks))
    layers = []
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for module in block:
                for index, tb in enumerate(getattr(module, "transformer_blocks", [])):
                    layers.append(AttentionLayer(name, number, index, tb.attn1.to_q.in_features))
    return layers


# -- concepts on MODEL and CLIP ----------------------------------------------------------------
def check_concept_fits(concept: concept_io.Concept, model, clip=None) -> None:
    """Raise ConceptError when the concept's tensors do not match this MODEL (and CLIP)."""
    diffusion_model = model.get_model_object("diffusion_model")
    shapes = {f"diffusion_model.{k}": tuple(v.shape) for k, v in diffusion_model.state_dict().items()}
    dims = {layer.key: layer.dim for layer in attention_layers(diffusion_model)}
    token_dim = concept.token_lf.shape[0]
    if clip is not None:
        token_dim = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1]
    concept_io.check_fits(concept, token_dim, shapes, dims, model_name="this checkpoint")


def apply_concept_to_model(model, concept: concept_io.Concept, strength: float):
    """A clone of MODEL with the concept's cross-attention K/V deltas as weight patches (they add to
    LoRAs and other patches on the same weights)."""
    patched = model.clone()
    patches = {key: (delta,) for key, delta in concept.kv_deltas.items()}  # a 1-tuple is a "diff" patch
    patched.add_patches(patches, strength)
    return patched


class ConceptTokenizer:
    """A CLIP tokenizer in which each concept's prompt token stands for its embedding S*_ori.

    The concept token becomes an ``embedding:`` reference resolved here, so weights like
    ``(<token>:1.2)`` work as they do for textual inversions.
    """

    PREFIX = "eqdiff-concept-"

    def __init__(self, inner, embeddings: dict[str, torch.Tensor]):
        self.inner = copy.copy(inner)
        sd_tokenizer = copy.copy(getattr(inner, inner.clip))
        setattr(self.inner, inner.clip, sd_tokenizer)
        own = dict(embeddings)
        names = {token: f"{self.PREFIX}{i}" for i, token in enumerate(own)}
        self._vectors = {names[t]: v for t, v in own.items()}
        self._pattern = re.compile("|".join(rf"(?<![\w<>]){re.escape(t)}(?![\w<>])" for t in sorted(own, key=len, reverse=True)))
        self._names = names
        fallback = sd_tokenizer._try_get_embedding
        if sd_tokenizer.embedding_directory is None:
            sd_tokenizer.embedding_directory = []

        def try_get_embedding(embedding_name: str):
            first, _, leftover = embedding_name.strip().partition(" ")
            vector = self._vectors.get(first.rstrip(","))
            if vector is None:
                return fallback(embedding_name)
            return vector, (", " + leftover if first.endswith(",") else leftover)

        sd_tokenizer._try_get_embedding = try_get_embedding

    def rewrite(self, text: str) -> str:
        return self._pattern.sub(lambda m: f" embedding:{self._names[m.group(0)]} ", text)

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        return self.inner.tokenize_with_weights(self.rewrite(text), return_word_ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def apply_concept_to_clip(clip, concept: concept_io.Concept, token: str):
    patched = clip.clone()
    patched.tokenizer = ConceptTokenizer(clip.tokenizer, {token: concept.token_ori.float()})
    return patched


# -- Residual Reference Attention in ComfyUI's sampler -----------------------------------------
@dataclass
class ReferenceSettings:
    noise: str = "clean"          # "clean": the clean latent at the current step; "noised": seeded noise
    seed: int = 0
    rows: str = "cond_uncond"     # "cond_uncond" or "cond"
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    cache: bool = True


@dataclass
class _StepState:
    """Per-UNet-call state, kept in transformer_options so that clones never share it."""

    layers: dict
    rows: torch.Tensor | None            # target rows that read the reference (None: all)
    target_rows: int                     # rows of the batch that are targets (the rest are reference rows)
    bank: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)
    write: bool = False
    record: frozenset = frozenset()      # layers whose reference attention maps are kept (training)
    recorded_rows: int = 0
    maps: dict = field(default_factory=dict)
    placeholder_index: int = 0


class ReferenceFeatureCache:
    """Reference features per noise level, so that repeated runs skip the reference pass.

    An entry is served only for the same model weights (model object and its weight patches), the
    same reference latent and context, the same noising and the same sigma: features computed
    under other weights, another reference or another schedule are never reused.
    """

    def __init__(self, max_entries: int = 128):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self._model_ref = None

    def _weights_key(self, base_model):
        # the model object itself is checked through the weakref; this is what changes on it
        return (str(getattr(base_model, "current_weight_patches_uuid", None)), str(base_model.get_dtype()))

    def get(self, base_model, key):
        if self._model_ref is None or self._model_ref() is not base_model:
            return None
        found = self._entries.get((self._weights_key(base_model), key))
        if found is not None:
            self._entries.move_to_end((self._weights_key(base_model), key))
        return found

    def put(self, base_model, key, features: dict) -> None:
        if self._model_ref is None or self._model_ref() is not base_model:
            self._entries.clear()
            self._model_ref = weakref.ref(base_model)
        self._entries[(self._weights_key(base_model), key)] = features
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class ReferenceAttention:
    """RRA on a MODEL: the APPLY_MODEL wrapper, the attention patches and the feature cache.

    Per sampling step the reference latent goes through the same UNet once (its rows appended to
    the batch when nothing else patches the model, as a separate call otherwise). Its self-attention
    inputs F^r are kept for that step only; the target rows of each RRA layer fuse them (Eq. 8-9).
    Patch objects return themselves on deepcopy and ``to()``, so model clones share them.
    """

    def __init__(self, concept: concept_io.Concept, layer_keys: list[str], reference_latent: torch.Tensor,
                 reference_context: torch.Tensor, settings: ReferenceSettings):
        self.layers = {}
        for key in layer_keys:
            p = concept.rra[key]
            layer = rra.RRALayer(p["to_k_res"].shape[0])
            layer.load_state_dict({"to_k_res.weight": p["to_k_res"], "to_v_res.weight": p["to_v_res"],
                                   "h_r.weight": p["h_r.weight"], "h_r.bias": p["h_r.bias"]})
            self.layers[key] = layer.requires_grad_(False)
        self.reference_latent = reference_latent   # (1, 4, h, w), raw VAE latent
        self.reference_context = reference_context  # (1, T, D)
        self.settings = settings
        self.cache = ReferenceFeatureCache()
        self.identity = hashlib.sha256(
            concept.fingerprint().encode()
            + reference_latent.float().cpu().numpy().tobytes()
            + reference_context.float().cpu().numpy().tobytes()
        ).hexdigest()[:16]
        self.stats = {"reference_passes": 0, "cache_hits": 0}
        self._cast: dict = {}
        self.record_layers: frozenset = frozenset()  # layers whose maps and gates the last call keeps
        self.last_maps: dict = {}

    def __deepcopy__(self, memo):  # model clones deep-copy their wrappers; they share this object
        return self

    # -- registration ----------------------------------------------------------------------------
    def patch(self, model):
        patched = model.clone()
        patched.set_model_attn1_patch(_ReferenceWriter(self))
        patched.set_model_attn1_output_patch(_ReferenceFuser(self))
        for key in self.layers:
            block, number, index = key.split(".")
            patched.set_model_attn1_replace(_RRAAttention(self, key), block, int(number), int(index))
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, RRA_KEY, self.apply_model)
        return patched

    @property
    def strength(self) -> float:
        return self.settings.strength

    def layer(self, key: str, like: torch.Tensor) -> rra.RRALayer:
        """The RRA layer on the device and in the dtype of the activations (cast once)."""
        cache_key = (key, like.device, like.dtype)
        if cache_key not in self._cast:
            self._cast[cache_key] = copy.deepcopy(self.layers[key]).to(like.device, like.dtype)
        return self._cast[cache_key]

    # -- the wrapper ------------------------------------------------------------------------------
    def _active(self, base_model, sigma: float) -> bool:
        ms = base_model.model_sampling
        high = float(ms.percent_to_sigma(self.settings.start_percent))
        low = float(ms.percent_to_sigma(self.settings.end_percent))
        return low <= sigma <= high

    def _reference_input(self, base_model, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The reference row in sampling space: at the UNet's input it is the clean latent
        (``clean``) or the latent noised to sigma with seeded noise (``noised``)."""
        z = base_model.process_latent_in(self.reference_latent.to(like.device, torch.float32))
        if z.shape[-2:] != like.shape[-2:]:
            z = F.interpolate(z, size=like.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        s = sigma.to(z.device, torch.float32).view(1, 1, 1, 1)
        if self.settings.noise == "noised":
            gen = torch.Generator(device="cpu").manual_seed(self.settings.seed)
            noise = torch.randn(z.shape, generator=gen).to(z.device)
            x = base_model.model_sampling.noise_scaling(s.view(1), noise, z)
        else:
            x = z * torch.sqrt(s * s + 1.0)  # calculate_input divides by sqrt(sigma^2 + 1)
        return x.to(like.dtype)

    def _context(self, like: torch.Tensor) -> torch.Tensor:
        ctx = self.reference_context.to(like.device, like.dtype)
        tokens = like.shape[1]
        if tokens != ctx.shape[1] and tokens % ctx.shape[1] == 0:
            ctx = ctx.repeat(1, tokens // ctx.shape[1], 1)  # repeating all keys leaves attention unchanged
        return ctx

    def _target_rows(self, batch: int, transformer_options) -> torch.Tensor | None:
        if self.settings.rows == "cond_uncond":
            return None
        chunks = transformer_options.get("cond_or_uncond", [0])
        per_chunk = batch // max(len(chunks), 1)
        rows = [i * per_chunk + j for i, c in enumerate(chunks) if c == 0 for j in range(per_chunk)]
        return torch.tensor(rows, dtype=torch.long)

    def _can_share_call(self, c_concat, control, transformer_options, kwargs) -> bool:
        """Reference rows may ride in the target call only when nothing else sees the batch."""
        if c_concat is not None or control is not None:
            return False
        if any(torch.is_tensor(v) for v in kwargs.values()):
            return False
        patches = transformer_options.get("patches", {})
        ours = (_ReferenceWriter, _ReferenceFuser)
        for plist in patches.values():
            if any(not isinstance(p, ours) for p in plist):
                return False
        for replaces in transformer_options.get("patches_replace", {}).values():
            if any(not isinstance(p, _RRAAttention) for p in replaces.values()):
                return False
        wrappers = transformer_options.get("wrappers", {})
        for wtype, keyed in wrappers.items():
            for key, funcs in keyed.items():
                if funcs and not (wtype == comfy.patcher_extension.WrappersMP.APPLY_MODEL and key == RRA_KEY):
                    return False
        return True

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                    transformer_options={}, **kwargs):
        base_model = executor.class_obj
        sigma = t[:1]
        sigma_value = float(sigma)  # one device sync per call
        if not self._active(base_model, sigma_value):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        batch = x.shape[0]
        rows = self._target_rows(batch, transformer_options)
        state = _StepState(self.layers, rows, batch, record=self.record_layers,
                           recorded_rows=batch if self.record_layers else 0)
        self.last_maps = state.maps
        cache_key = (self.identity, self.settings.noise, self.settings.seed, tuple(x.shape[-2:]),
                     round(sigma_value, 6), str(x.device))
        cached = self.cache.get(base_model, cache_key) if self.settings.cache else None
        options = dict(transformer_options)
        options[RRA_KEY] = state
        try:
            if cached is not None:
                self.stats["cache_hits"] += 1
                state.bank = cached
                return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
            self.stats["reference_passes"] += 1
            ref_x = self._reference_input(base_model, sigma, x)
            ref_ctx = self._context(c_crossattn)
            state.write = True
            if ref_ctx.shape[1] == c_crossattn.shape[1] and self._can_share_call(c_concat, control,
                                                                                   transformer_options, kwargs):
                out = executor(torch.cat([x, ref_x]), torch.cat([t, sigma]), None,
                               torch.cat([c_crossattn, ref_ctx]), None, options, **kwargs)[:batch]
            else:
                ref_options = dict(transformer_options)
                ref_options["cond_or_uncond"] = [0]
                ref_options[RRA_KEY] = _StepState(self.layers, None, 0, state.bank, write=True)
                executor(ref_x, sigma, None, ref_ctx, None, ref_options, **kwargs)
                state.write = False
                out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
            if self.settings.cache:
                self.cache.put(base_model, cache_key, state.bank)
            return out
        finally:
            state.pending.clear()


def _layer_key(extra_options) -> str | None:
    block = extra_options.get("block")
    if block is None:
        return None
    return f"{block[0]}.{block[1]}.{extra_options.get('block_index', 0)}"


class _PatchBase:
    def __init__(self, owner: ReferenceAttention):
        self.owner = owner

    def __deepcopy__(self, memo):
        return self

    def to(self, device_or_dtype):
        return self


class _ReferenceWriter(_PatchBase):
    """attn1_patch: keeps the reference rows' normed hidden states F^r of every RRA layer."""

    def __call__(self, n, context_attn1, value_attn1, extra_options):
        state = extra_options.get(RRA_KEY)
        if state is not None and state.write:
            key = _layer_key(extra_options)
            if key in state.layers:
                state.bank[key] = n[state.target_rows:].detach()
        return n, context_attn1, value_attn1


class _RRAAttention(_PatchBase):
    """attn1 replace of an RRA layer: the layer's own attention SA, plus the reference attention and
    H_r for the target rows, whose fusion waits for the output projection (_ReferenceFuser)."""

    def __init__(self, owner: ReferenceAttention, key: str):
        super().__init__(owner)
        self.key = key

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        attention = comfy_attention.optimized_attention
        sa = attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                       transformer_options=extra_options)
        state = extra_options.get(RRA_KEY)
        reference = state.bank.get(self.key) if state is not None else None
        if reference is None or state.target_rows == 0:
            return sa
        targets = slice(0, state.target_rows) if state.rows is None else state.rows.to(q.device)
        layer = self.owner.layer(self.key, q)
        if self.key in state.record:
            attention = _MapRecorder(state.maps, self.key, state.recorded_rows)
        f_ra, gate = layer(q[targets], sa[targets], reference.to(q.dtype), heads, attention=attention)
        if self.key in state.record:
            state.maps[("gate", self.key)] = gate[: state.recorded_rows, :, 0].detach()
        state.pending[self.key] = (targets, f_ra, gate * self.owner.strength)
        return sa


class _MapRecorder:
    """An attention function that also keeps the head-averaged map of the first rows under ``key``.
    The kept map sees the queries detached: L_ra then moves the reference keys (the RRA projections)
    and not the target features that every other trained tensor shapes."""

    def __init__(self, maps: dict, key, rows: int):
        self.maps, self.key, self.rows = maps, key, rows

    def __call__(self, q, k, v, heads, **kwargs):
        self.maps[self.key] = rra.attention_probs(q[: self.rows].detach(), k[: self.rows], heads).mean(dim=1)
        return rra.multihead_attention(q, k, v, heads)


class _ReferenceFuser(_PatchBase):
    """attn1_output_patch: F_RRA = H_s(SA) (1 - M^f) + F_RA M^f on the target rows (Eq. 9)."""

    def __call__(self, n, extra_options):
        state = extra_options.get(RRA_KEY)
        if state is None:
            return n
        pending = state.pending.pop(_layer_key(extra_options), None)
        if pending is None:
            return n
        targets, f_ra, gate = pending
        out = n.clone()
        out[targets] = rra.residual_reference_fusion(n[targets], f_ra, gate)
        return out


# -- DDIM ------------------------------------------------------------------------------------------
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


# -- training --------------------------------------------------------------------------------------
def attention_levels(diffusion_model) -> dict[str, int]:
    """How many times the latent is halved at each transformer block: {layer key: level}."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    levels, level = {}, 0

    def visit(name, number, block, lvl):
        for module in block:
            for index, _ in enumerate(getattr(module, "transformer_blocks", [])):
                levels[f"{name}.{number}.{index}"] = lvl

    for number, block in enumerate(diffusion_model.input_blocks):
        visit("input", number, block, level)
        level += sum(isinstance(m, Downsample) for m in block)
    visit("middle", 0, diffusion_model.middle_block, level)
    for number, block in enumerate(diffusion_model.output_blocks):
        visit("output", number, block, level)
        level -= sum(isinstance(m, Upsample) for m in block)
    return levels


def loss_layers(levels: dict[str, int], rra_keys) -> list[str]:
    """The RRA layers of L_ra: the output-block ones at the coarsest resolution (SD1.5: the three 16x16
    layers of output blocks 3-5 at 512 px, the authors' up_blocks.1)."""
    output = [k for k in rra_keys if k.startswith("output.")]
    level = max((levels[k] for k in output), default=None)
    return sorted(k for k in output if levels[k] == level)


def reference_maps(model, concept, layer_keys, reference_latent, reference_context, latent, context, percent, seed):
    """One evaluation of the RRA-patched MODEL on ``latent`` noised to ``percent`` of the schedule;
    returns the reference attention maps {layer: (B, N, M)} and gates {("gate", layer): (B, N)}."""
    attention = ReferenceAttention(concept, layer_keys, reference_latent, reference_context,
                                   ReferenceSettings(cache=False))
    attention.record_layers = frozenset(layer_keys)
    patched = attention.patch(model)
    comfy.model_management.load_models_gpu([patched])
    base = patched.model
    device = comfy.model_management.get_torch_device()
    z = base.process_latent_in(latent.to(device, torch.float32))
    sigma = torch.full((z.shape[0],), float(base.model_sampling.percent_to_sigma(percent)), device=device)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    x = base.model_sampling.noise_scaling(sigma, noise, z)
    options = copy.copy(patched.model_options["transformer_options"])
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patched.wrappers)  # as the sampler does
    with torch.no_grad():
        base.apply_model(x, sigma, c_crossattn=context.to(device).expand(z.shape[0], -1, -1),
                         transformer_options=options)
    return attention.last_maps


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


def frozen_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A private copy of a loaded model part for training: ComfyUI's weights are inference tensors,
    which autograd cannot save, and the user's MODEL/CLIP must stay untouched."""
    with torch.inference_mode(False):
        copied = copy.deepcopy(module)
        copied.to(dtype=dtype)
        copied.requires_grad_(False)
        copied.eval()
    return copied


def weights_fingerprint(diffusion_model) -> str:
    """A cheap digest of the UNet's weights (shapes and a strided sample of each), to tell base models apart."""
    h = hashlib.sha256()
    for name, t in diffusion_model.state_dict().items():
        flat = t.detach().flatten()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


class _KVDelta:
    """weight_function of a cross-attention K/V projection: W + delta while the trained UNet runs."""

    def __init__(self, backend: "TrainingBackend", key: str):
        self.backend, self.key = backend, key

    def __call__(self, weight):
        if not self.backend.kv_enabled:
            return weight
        return (weight.float() + self.backend.params.kv_delta(self.key)).to(weight.dtype)


class _TokenAttention(_PatchBase):
    """attn2 replace of a loss layer: cross-attention written out, keeping the placeholder's map."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, q, k, v, extra_options):
        state = extra_options.get(RRA_KEY)
        out, probs = rra.attention_with_map(q, k, v, extra_options["n_heads"])
        if state is not None and state.recorded_rows:
            state.maps[("token", self.key)] = probs[: state.recorded_rows, :, state.placeholder_index]
        return out


class TrainingBackend:
    """eqdiff_core.training's DiffusionBackend over a ComfyUI MODEL and CLIP.

    Private copies of the UNet and the CLIP text encoder carry the gradients; the concept's K/V deltas
    act as weight functions of the copy (off for the reference pass, which sees the base weights),
    and RRA runs through the same attention patches as at inference.
    """

    def __init__(self, model, clip, params, settings, *, token: str, class_word: str, dtype: torch.dtype,
                 gradient_checkpointing: bool):
        device = comfy.model_management.get_torch_device()
        self.device, self.dtype, self.params, self.settings = device, dtype, params, settings
        self.autocast = dtype != torch.float32
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        source = model.get_model_object("diffusion_model")
        self.unet = frozen_copy(source, dtype)
        sigmas = model.get_model_object("model_sampling").sigmas.float()
        self.alphas_cumprod = (1.0 / (1.0 + sigmas**2)).to(device)
        self.kv_enabled = True
        for name, module in self.unet.named_modules():
            key = f"diffusion_model.{name}.weight"
            if key in params.kv_keys:
                module.weight_function = [_KVDelta(self, key)]  # an own list, not the class default
        if gradient_checkpointing:
            from comfy.ldm.modules.attention import SpatialTransformer
            from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

            for module in self.unet.modules():
                if isinstance(module, (ResBlock, SpatialTransformer)):
                    module.forward = _checkpointed(module.forward)

        levels = attention_levels(self.unet)
        self.ra_layers = frozenset(loss_layers(levels, params.rra_keys))
        ca_level = levels[next(iter(self.ra_layers))] if self.ra_layers else max(levels.values())
        self.token_layers = [k for k, lvl in levels.items() if lvl == ca_level and not k.startswith("middle")]
        self.rra = _TrainingRRA(params)

        self.text = self._text_encoder(clip, dtype)
        prompt = settings.prompt_template.format(token=token, class_word=class_word)
        self.instance_tokens, self.placeholder_index = self._instance_tokens(clip, prompt, token)
        with torch.inference_mode(False):
            cond = clip.encode_from_tokens(clip.tokenize(settings.class_prompt.format(class_word=class_word)))
            self._class_context = cond.to(device, torch.float32).clone()

    @staticmethod
    def _text_encoder(clip, dtype):
        comfy.model_management.load_models_gpu([clip.patcher])
        encoder = frozen_copy(clip.cond_stage_model.clip_l, dtype)
        if clip.layer_idx is not None:
            encoder.set_clip_options({"layer": clip.layer_idx})
        for layer in encoder.transformer.text_model.encoder.layers:
            layer.forward = _out_of_place_clip_layer.__get__(layer)
        return encoder

    @staticmethod
    def _instance_tokens(clip, prompt: str, token: str):
        marker = torch.zeros(clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[1])
        chunks = next(iter(ConceptTokenizer(clip.tokenizer, {token: marker}).tokenize_with_weights(prompt).values()))
        if len(chunks) != 1:
            raise ValueError(f"prompt_template: '{prompt}' is longer than one 77-token chunk; shorten it")
        ids = [t for t, _ in chunks[0]]
        where = [i for i, t in enumerate(ids) if torch.is_tensor(t)]
        if len(where) != 1:
            raise ValueError(f"prompt_template: '{prompt}' must contain the token exactly once")
        return ids, where[0]

    # -- DiffusionBackend ---------------------------------------------------------------------------
    def _autocast(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def instance_context(self, embeddings):
        rows = [[e if torch.is_tensor(t) else t for t in self.instance_tokens] for e in embeddings]
        with self._autocast():
            return self.text(rows)[0].float().to(self.device)  # the text encoder may live on another device

    def class_context(self):
        return self._class_context

    def _options(self, state) -> dict:
        patches = {"attn1_patch": [_ReferenceWriter(self.rra)], "attn1_output_patch": [_ReferenceFuser(self.rra)]}
        replace = {"attn1": {_block(k): _RRAAttention(self.rra, k) for k in self.params.rra_keys}}
        if state.recorded_rows and self.settings.cross_attention_loss_weight > 0:
            replace["attn2"] = {_block(k): _TokenAttention(k) for k in self.token_layers}
        return {"patches": patches, "patches_replace": replace, RRA_KEY: state}

    def _unet(self, x, timesteps, context, state):
        with self._autocast():
            out = self.unet(x.to(self.dtype), timesteps=timesteps.float(), context=context.to(self.dtype),
                            transformer_options=self._options(state))
        return out.float()

    def reference_features(self, x, timesteps, context):
        state = _StepState(self.rra.layers, None, 0, write=True)
        self.kv_enabled = False
        try:
            self._unet(x, timesteps, context, state)
        finally:
            self.kv_enabled = True
        return state.bank

    def predict(self, x, timesteps, context, reference, recorded_rows):
        from ..eqdiff_core.training import StepOutput

        state = _StepState(self.rra.layers, None, x.shape[0], bank=reference or {},
                           record=self.ra_layers if reference else frozenset(), recorded_rows=recorded_rows,
                           placeholder_index=self.placeholder_index)
        noise = self._unet(x, timesteps, context, state)
        ra = [state.maps[k] for k in sorted(self.ra_layers) if k in state.maps]
        token = [v for k, v in state.maps.items() if isinstance(k, tuple)]
        return StepOutput(noise, torch.stack(ra).mean(0) if ra else None,
                          torch.stack(token).mean(0) if token else None)


def _block(key: str) -> tuple[str, int, int]:
    block, number, index = key.split(".")
    return block, int(number), int(index)


class _TrainingRRA:
    """The owner the RRA patches ask for their layer while training: the trainable ones, uncast
    (autocast casts inside)."""

    strength = 1.0

    def __init__(self, params):
        self.params = params
        self.layers = {k: None for k in params.rra_keys}

    def layer(self, key, like):
        return self.params.rra_layer(key)


def _resize_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> (B, 3, R, R) in [-1, 1] on the compute device (squashed to a square, as the
    authors do; crop upstream to keep the aspect ratio)."""
    x = image_to_bchw(images[..., :3].float())
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x * 2.0 - 1.0


def _encode(model, vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, R, R) in [-1, 1] (any range: magnitude bands exceed 1) -> UNet-space latents (B, 4, R/8, R/8)."""
    latent = vae.encode(((pixels + 1.0) / 2.0).movedim(1, -1))
    return model.model.process_latent_in(latent.to(comfy.model_management.get_torch_device(), torch.float32))


def training_data(model, vae, images, masks, class_images, settings, resolution: int):
    """Everything the steps reuse: VAE latents of the photos and of their bands, the masks at latent
    size, the canvas latent and the class images' latents (eqdiff_core.training.TrainingData)."""
    from ..eqdiff_core import training

    def band_latents(pixels):  # (B, 3, R, R) -> (3, B, 4, R/8, R/8): LOW, HIGH, ORIGINAL
        low, high = training.frequency_bands(pixels, settings)
        return torch.stack([_encode(model, vae, low), _encode(model, vae, high), _encode(model, vae, pixels)])

    with torch.inference_mode(False), torch.no_grad():
        pixels = _resize_images(images, resolution)
        latents = band_latents(pixels)
        size = tuple(latents.shape[-2:])
        m = F.interpolate(masks[:, None].float().to(latents.device), size=(resolution, resolution), mode="area")[:, 0]
        loss_masks = training.latent_mask(m, size, settings.dilate_iterations, settings.dilate_kernel)
        subject = training.latent_mask(m, size)
        canvas = _encode(model, vae, torch.zeros_like(pixels[:1]))[0]
        prior = None
        if class_images is not None:
            prior = band_latents(_resize_images(class_images, resolution)).transpose(0, 1)
        return training.TrainingData(latents.clone(), loss_masks.clone(), subject.clone(), canvas.clone(),
                                     None if prior is None else prior.clone())


def initial_parameters(model, clip, settings, resume=None):
    """The trained tensors at step 0: both embeddings from ``settings.init_token``, zero K/V deltas,
    RRA layers whose reference projections start as the layer's K/V and whose H_r is zero. With a
    concept to resume from, its tensors."""
    from ..eqdiff_core import training

    if resume is not None:
        return training.ConceptParameters.from_concept(resume)
    diffusion_model = model.get_model_object("diffusion_model")
    weights = diffusion_model.state_dict()
    kv = {}
    if settings.train_kv:
        kv = {f"diffusion_model.{k}": torch.zeros(v.shape) for k, v in weights.items()
              if re.search(r"attn2\.to_[kv]\.weight$", k)}
    layers = {}
    if settings.train_rra:
        wanted = rra.RRA_LAYER_SETS[settings.rra_layers]
        for layer in attention_layers(diffusion_model):
            if layer.block in wanted:
                prefix = _layer_prefix(diffusion_model, layer)
                layers[layer.key] = rra.RRALayer.from_self_attention(
                    weights[f"{prefix}.attn1.to_k.weight"].float().cpu().clone(),
                    weights[f"{prefix}.attn1.to_v.weight"].float().cpu().clone())
    embeddings = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    tokens = next(iter(clip.tokenizer.tokenize_with_weights(settings.init_token).values()))[0]
    first = tokens[1][0]  # after the start token
    init = embeddings[first].detach().float().cpu().clone()
    with torch.inference_mode(False):
        return training.ConceptParameters(init, init, kv, layers)


def _layer_prefix(diffusion_model, layer: AttentionLayer) -> str:
    """The state-dict prefix of a transformer block, e.g. output_blocks.3.1.transformer_blocks.0."""
    blocks = {"input": "input_blocks", "middle": "middle_block", "output": "output_blocks"}[layer.block]
    container = diffusion_model.middle_block if layer.block == "middle" else getattr(diffusion_model, blocks)[layer.number]
    for i, module in enumerate(container):
        if hasattr(module, "transformer_blocks"):
            base = f"{blocks}.{i}" if layer.block == "middle" else f"{blocks}.{layer.number}.{i}"
            return f"{base}.transformer_blocks.{layer.index}"
    raise KeyError(layer.key)
