"""Residual Reference Attention inside ComfyUI: attention patches, the reference pass and its cache.

Per sampling step the reference latent goes through the same UNet once (its rows appended to the
batch when nothing else patches the model, as a call of its own otherwise). Its self-attention inputs
F^r are kept for that step only; the target rows of each RRA layer fuse them (Eq. 8-9).

State lives in three places, from the longest-lived to the shortest:
- ``ReferenceAttention``: what the RRA Patch node built (the layers' weights, the reference, the
  settings) and the feature cache; shared by every clone of the patched MODEL (patch objects return
  themselves on deepcopy), never changed by a run except for the cache;
- ``ReferenceRun``: one sampling run's counters and recorded maps, made fresh by the OUTER_SAMPLE
  wrapper from the template in the MODEL's transformer_options (as ComfyUI's EasyCache does), and
  reported to the patch's ``RunLog`` when the run ends;
- ``StepState``: one UNet call's reference features and pending fusions, in transformer_options.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import comfy.model_patcher
import comfy.patcher_extension
from comfy.ldm.modules import attention as comfy_attention

from ...eqdiff_core import concept as concept_io
from ...eqdiff_core import rra
from .unet import attention_layers, layer_key, parse_key
from .weights import concept_strength

STEP_KEY = "eqdiff_rra"        # transformer_options: this UNet call's StepState
RUN_KEY = "eqdiff_rra_run"     # transformer_options: this run's ReferenceRun (the template outside runs)
WRAPPER_KEY = "eqdiff_rra"


COND, UNCOND = 0, 1           # ComfyUI's cond_or_uncond values


@dataclass
class ReferenceSettings:
    noise: str = "clean"          # "clean": the clean latent at the current step; "noised": seeded noise
    seed: int = 0
    rows: str = "cond_uncond"     # "cond_uncond" or "cond"
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    cache: bool = True
    contexts: str = "per_branch"  # "per_branch": a reference row per CFG branch, each with its branch's text
                                  # (the authors); "shared": one row with the reference text for both
    weights: str = "base"         # "base": the reference pass without the concept's K/V (the authors);
                                  # "model": through the MODEL as it is


CONTEXTS = ("per_branch", "shared")
WEIGHTS = ("base", "model")


class RunLog:
    """Where finished runs report (the last 16); shared by the clones of a patched MODEL."""

    def __init__(self, size: int = 16):
        self.runs: deque = deque(maxlen=size)

    def __deepcopy__(self, memo):
        return self

    @property
    def last(self) -> "ReferenceRun":
        return self.runs[-1]


@dataclass
class ReferenceRun:
    """One sampling run: its counters and the maps it records (layer -> tensor)."""

    record: frozenset = frozenset()            # layers whose reference maps and gates are kept
    log: RunLog = field(default_factory=RunLog)
    reference_passes: int = 0
    cache_hits: int = 0
    reference_maps: dict = field(default_factory=dict)  # layer -> (B, N, M), averaged over heads
    gates: dict = field(default_factory=dict)           # layer -> (B, N), M^f

    def fresh(self) -> "ReferenceRun":
        return ReferenceRun(self.record, self.log)

    @property
    def stats(self) -> dict:
        return {"reference_passes": self.reference_passes, "cache_hits": self.cache_hits}


@dataclass
class StepState:
    """One UNet call: the reference features (bank) and what the RRA layers compute on the way."""

    layers: frozenset                     # RRA layers: their reference features are kept
    rows: torch.Tensor | None             # target rows that read the reference (None: all)
    target_rows: int                      # rows of the batch that are targets (the rest are reference rows)
    bank: dict = field(default_factory=dict)
    bank_rows: torch.Tensor | None = None  # per target row, its reference row in the bank (None: row 0)
    kv_corrections: dict = field(default_factory=dict)  # layer -> (dK, dV) to take off the reference rows
    cross_context: dict = field(default_factory=dict)   # layer -> (context, value) of the reference rows
    pending: dict = field(default_factory=dict)
    write: bool = False
    record: frozenset = frozenset()       # layers whose reference maps and gates are kept
    recorded_rows: int = 0
    reference_maps: dict = field(default_factory=dict)
    gates: dict = field(default_factory=dict)
    token_maps: dict = field(default_factory=dict)  # training: the placeholder's cross-attention maps
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
        return (str(base_model.current_weight_patches_uuid), str(base_model.get_dtype()))

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


def rra_layers(concept: concept_io.Concept, keys) -> dict[str, rra.RRALayer]:
    """The concept's RRA layers as frozen modules, keyed by layer."""
    layers = {}
    for key in keys:
        p = concept.rra[key]
        layer = rra.RRALayer(p["to_k_res"].shape[0])
        layer.load_state_dict({"to_k_res.weight": p["to_k_res"], "to_v_res.weight": p["to_v_res"],
                               "h_r.weight": p["h_r.weight"], "h_r.bias": p["h_r.bias"]})
        layers[key] = layer.requires_grad_(False)
    return layers


class ReferenceAttention:
    """RRA on a MODEL: the wrappers, the attention patches and the feature cache (see the module doc)."""

    def __init__(self, concept: concept_io.Concept, layer_keys: list[str], reference_latent: torch.Tensor,
                 reference_context: torch.Tensor, settings: ReferenceSettings):
        self.concept = concept
        self.layers = rra_layers(concept, layer_keys)
        self.reference_latent = reference_latent   # (1, 4, h, w), raw VAE latent
        self.reference_context = reference_context  # (1, T, D)
        self.settings = settings
        self.cache = ReferenceFeatureCache()
        self.identity = hashlib.sha256(
            concept.fingerprint().encode()
            + reference_latent.float().cpu().numpy().tobytes()
            + reference_context.float().cpu().numpy().tobytes()
        ).hexdigest()[:16]
        self._cast: dict = {}

    def __deepcopy__(self, memo):  # model clones deep-copy their wrappers; they share this object
        return self

    # -- registration ----------------------------------------------------------------------------
    def patch(self, model, record=()):
        """A clone of MODEL with RRA; ``record``: layers whose maps each run keeps (the maps node)."""
        patched = model.clone()
        patched.set_model_attn1_patch(ReferenceWriter())
        patched.set_model_attn1_output_patch(ReferenceFuser())
        for key in self.layers:
            patched.set_model_attn1_replace(RRAAttention(self, key), *parse_key(key))
        self.kv_corrections = {}
        if self.settings.weights == "base":
            self.kv_corrections = self._kv_corrections(model)
            replaced = model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
            patched.set_model_attn2_patch(CrossContextRecorder())
            for key in self.kv_corrections:
                patch_key = parse_key(key)
                patched.set_model_attn2_replace(BaseWeightCrossAttention(key, replaced.get(patch_key)), *patch_key)
        patched.model_options["transformer_options"][RUN_KEY] = ReferenceRun(frozenset(record))
        wrappers = comfy.patcher_extension.WrappersMP
        patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, self.outer_sample)
        patched.add_wrapper_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY, self.apply_model)
        return patched

    def _kv_corrections(self, model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (s dK, s dV)}: the concept's K/V deltas as Apply Concept put them on this MODEL
        (strength s, recorded in its options); the reference rows take them off again."""
        strength = concept_strength(model, self.concept)
        if strength == 0.0:
            return {}
        layers = {layer.prefix: layer.key for layer in attention_layers(model.get_model_object("diffusion_model"))}
        out = {}
        for name, delta in self.concept.kv_deltas.items():
            prefix, _, projection = name[len("diffusion_model."):].rpartition(".attn2.")
            if prefix in layers:
                pair = out.setdefault(layers[prefix], [None, None])
                pair[0 if projection == "to_k.weight" else 1] = delta.float() * strength
        return {k: (dk, dv) for k, (dk, dv) in out.items() if dk is not None and dv is not None}

    @property
    def strength(self) -> float:
        return self.settings.strength

    def layer(self, key: str, like: torch.Tensor) -> rra.RRALayer:
        """The RRA layer on the device and in the dtype of the activations (cast once)."""
        cache_key = (key, like.device, like.dtype)
        if cache_key not in self._cast:
            self._cast[cache_key] = copy.deepcopy(self.layers[key]).to(like.device, like.dtype)
        return self._cast[cache_key]

    # -- the wrappers -----------------------------------------------------------------------------
    def outer_sample(self, executor, *args, **kwargs):
        """Around one sampling run: a fresh ReferenceRun in a copy of the guider's options."""
        guider = executor.class_obj
        original = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        options = guider.model_options["transformer_options"]
        run = options[RUN_KEY].fresh()
        options[RUN_KEY] = run
        try:
            return executor(*args, **kwargs)
        finally:
            guider.model_options = original
            run.log.runs.append(run)
            logging.debug("EqDiff RRA: %d reference passes, %d cache hits", run.reference_passes, run.cache_hits)

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

    def _reference_rows(self, c_crossattn: torch.Tensor, transformer_options) -> tuple[list[int], list[torch.Tensor]]:
        """The CFG branches that get a reference row of their own, and each row's text context: the
        reference text for the conditional branch, the branch's own (negative) prompt for the
        unconditional one (``per_branch``, the authors: their unconditional reference reads ""); one
        row with the reference text otherwise."""
        chunks = transformer_options.get("cond_or_uncond") or [COND]
        if self.settings.contexts == "shared" or UNCOND not in chunks:
            return [COND], [self.reference_context.to(c_crossattn.device, c_crossattn.dtype)]
        per_chunk = c_crossattn.shape[0] // len(chunks)
        uncond = c_crossattn[chunks.index(UNCOND) * per_chunk][None]
        return [COND, UNCOND], [self.reference_context.to(c_crossattn.device, c_crossattn.dtype), uncond]

    def _bank_rows(self, branches: list[int], batch: int, transformer_options) -> torch.Tensor:
        """Per target row, the reference row of its CFG branch."""
        chunks = transformer_options.get("cond_or_uncond") or [COND]
        per_chunk = batch // len(chunks)
        return torch.tensor([branches.index(c) if c in branches else 0 for c in chunks for _ in range(per_chunk)],
                            dtype=torch.long)

    def _target_rows(self, batch: int, transformer_options) -> torch.Tensor | None:
        """The rows RRA acts on: the cond (and uncond) chunks; never the chunks of further conditions, such
        as the DCI Guider's auxiliary branch (cond_or_uncond 2 and 3), which has no concept tokens."""
        chunks = transformer_options.get("cond_or_uncond", [COND])
        wanted = (COND, UNCOND) if self.settings.rows == "cond_uncond" else (COND,)
        if self.settings.rows == "cond_uncond" and all(c in wanted for c in chunks):
            return None
        per_chunk = batch // max(len(chunks), 1)
        rows = [i * per_chunk + j for i, c in enumerate(chunks) if c in wanted for j in range(per_chunk)]
        return torch.tensor(rows, dtype=torch.long)

    @staticmethod
    def _common_length(contexts: list[torch.Tensor], length: int) -> list[torch.Tensor] | None:
        """The contexts repeated to ``length`` tokens (repeating all keys leaves attention unchanged), or
        None when one does not divide it."""
        if any(length % c.shape[1] for c in contexts):
            return None
        return [c.repeat(1, length // c.shape[1], 1) for c in contexts]

    @staticmethod
    def _can_share_call(c_concat, control, transformer_options, kwargs) -> bool:
        """Reference rows may ride in the target call only when nothing else sees the batch."""
        if c_concat is not None or control is not None:
            return False
        if any(torch.is_tensor(v) for v in kwargs.values()):
            return False
        ours = (ReferenceWriter, ReferenceFuser, CrossContextRecorder)
        for plist in transformer_options.get("patches", {}).values():
            if any(not isinstance(p, ours) for p in plist):
                return False
        for replaces in transformer_options.get("patches_replace", {}).values():
            for p in replaces.values():
                if not (isinstance(p, RRAAttention) or isinstance(p, BaseWeightCrossAttention) and p.inner is None):
                    return False
        for wtype, keyed in transformer_options.get("wrappers", {}).items():
            for key, funcs in keyed.items():
                ours_wrapper = key == WRAPPER_KEY and wtype in (comfy.patcher_extension.WrappersMP.APPLY_MODEL,
                                                               comfy.patcher_extension.WrappersMP.OUTER_SAMPLE)
                if funcs and not ours_wrapper:
                    return False
        return True

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                    transformer_options={}, **kwargs):
        base_model = executor.class_obj
        sigma = t[:1]
        sigma_value = float(sigma)  # one device sync per call
        if not self._active(base_model, sigma_value):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        run = transformer_options.get(RUN_KEY) or ReferenceRun()
        batch = x.shape[0]
        branches, contexts = self._reference_rows(c_crossattn, transformer_options)
        state = StepState(frozenset(self.layers), self._target_rows(batch, transformer_options), batch,
                          bank_rows=self._bank_rows(branches, batch, transformer_options),
                          kv_corrections=self.kv_corrections, record=run.record,
                          recorded_rows=batch if run.record else 0, reference_maps=run.reference_maps, gates=run.gates)
        texts = tuple(hashlib.sha256(c.float().cpu().numpy().tobytes()).hexdigest()[:16] for c in contexts[1:])
        cache_key = (self.identity, self.settings.noise, self.settings.seed, self.settings.weights, tuple(branches),
                     texts, tuple(x.shape[-2:]), round(sigma_value, 6), str(x.device))
        cached = self.cache.get(base_model, cache_key) if self.settings.cache else None
        options = dict(transformer_options)
        options[STEP_KEY] = state
        try:
            if cached is not None:
                run.cache_hits += 1
                state.bank = cached
                return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
            run.reference_passes += 1
            ref_x = self._reference_input(base_model, sigma, x).expand(len(branches), -1, -1, -1)
            ref_t = sigma.expand(len(branches))
            state.write = True
            shared = self._common_length(contexts, c_crossattn.shape[1])
            if shared is not None and self._can_share_call(c_concat, control, transformer_options, kwargs):
                out = executor(torch.cat([x, ref_x]), torch.cat([t, ref_t]), None,
                               torch.cat([c_crossattn, *shared]), None, options, **kwargs)[:batch]
            else:
                self._reference_call(executor, ref_x, ref_t, contexts, state.bank, transformer_options, kwargs)
                state.write = False
                out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
            if self.settings.cache:
                self.cache.put(base_model, cache_key, state.bank)
            return out
        finally:
            state.pending.clear()
            state.cross_context.clear()

    def _reference_call(self, executor, ref_x, ref_t, contexts, bank: dict, transformer_options, kwargs) -> None:
        """The reference rows in a UNet call of their own (one call, or one per row when their texts
        cannot share one)."""
        length = max(c.shape[1] for c in contexts)
        common = self._common_length(contexts, length)
        groups = [(slice(None), torch.cat(common))] if common is not None else \
            [(slice(i, i + 1), c) for i, c in enumerate(contexts)]
        parts: dict = {}
        for rows, context in groups:
            ref_options = dict(transformer_options)
            ref_options["cond_or_uncond"] = [COND] * ref_x[rows].shape[0]
            ref_state = StepState(frozenset(self.layers), None, 0, write=True, kv_corrections=self.kv_corrections)
            ref_options[STEP_KEY] = ref_state
            executor(ref_x[rows], ref_t[rows], None, context, None, ref_options, **kwargs)
            for key, features in ref_state.bank.items():
                parts.setdefault(key, []).append(features)
        bank.update({key: torch.cat(features) for key, features in parts.items()})


def run_log(model) -> RunLog:
    """The log that a MODEL patched with RRA reports its runs to."""
    return model.model_options["transformer_options"][RUN_KEY].log


# -- the attention patches -----------------------------------------------------------------------
class _Patch:
    """Attention patch objects are shared by the clones of a MODEL and never move."""

    def __deepcopy__(self, memo):
        return self

    def to(self, device_or_dtype):
        return self


class ReferenceWriter(_Patch):
    """attn1_patch: keeps the reference rows' normed hidden states F^r of every RRA layer."""

    def __call__(self, n, context_attn1, value_attn1, extra_options):
        state = extra_options.get(STEP_KEY)
        if state is not None and state.write:
            key = layer_key(extra_options)
            if key in state.layers:
                state.bank[key] = n[state.target_rows:].detach()
        return n, context_attn1, value_attn1


class RRAAttention(_Patch):
    """attn1 replace of an RRA layer: the layer's own attention SA, plus the reference attention and
    H_r for the target rows, whose fusion waits for the output projection (ReferenceFuser).

    ``owner`` gives the layer (``owner.layer(key, like)``) and the mask strength (``owner.strength``)."""

    def __init__(self, owner, key: str):
        self.owner = owner
        self.key = key

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        attention = comfy_attention.optimized_attention
        sa = attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                       transformer_options=extra_options)
        state = extra_options.get(STEP_KEY)
        reference = state.bank.get(self.key) if state is not None else None
        if reference is None or state.target_rows == 0:
            return sa
        targets = slice(0, state.target_rows) if state.rows is None else state.rows.to(q.device)
        if state.bank_rows is not None and reference.shape[0] > 1:  # each target row reads its branch's row
            reference = reference[state.bank_rows.to(reference.device)[targets]]
        layer = self.owner.layer(self.key, q)
        recording = self.key in state.record
        if recording:
            attention = _MapRecorder(state.reference_maps, self.key, state.recorded_rows)
        f_ra, gate = layer(q[targets], sa[targets], reference.to(q.dtype), heads, attention=attention)
        if recording:
            state.gates[self.key] = gate[: state.recorded_rows, :, 0].detach()
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


class ReferenceFuser(_Patch):
    """attn1_output_patch: F_RRA = H_s(SA) (1 - M^f) + F_RA M^f on the target rows (Eq. 9)."""

    def __call__(self, n, extra_options):
        state = extra_options.get(STEP_KEY)
        if state is None:
            return n
        pending = state.pending.pop(layer_key(extra_options), None)
        if pending is None:
            return n
        targets, f_ra, gate = pending
        out = n.clone()
        out[targets] = rra.residual_reference_fusion(n[targets], f_ra, gate)
        return out


class CrossContextRecorder(_Patch):
    """attn2_patch: keeps the text the reference rows' cross-attention projects, for the base-weight
    correction of BaseWeightCrossAttention."""

    def __call__(self, n, context_attn2, value_attn2, extra_options):
        state = extra_options.get(STEP_KEY)
        if state is not None and state.write and state.kv_corrections:
            key = layer_key(extra_options)
            if key in state.kv_corrections:
                rows = slice(state.target_rows, None)
                state.cross_context[key] = (context_attn2[rows], value_attn2[rows])
        return n, context_attn2, value_attn2


class BaseWeightCrossAttention(_Patch):
    """attn2 replace: the reference rows' keys and values without the concept's K/V deltas, i.e.
    x (W + s dW)^T - x (s dW)^T = x W^T, as the authors' separate base UNet computes them; target rows
    are untouched. ``inner``: another pack's replace of the same layer, which then gets the corrected
    keys and values."""

    def __init__(self, key: str, inner=None):
        self.key, self.inner = key, inner

    def __call__(self, q, k, v, extra_options):
        state = extra_options.get(STEP_KEY)
        recorded = state.cross_context.pop(self.key, None) if state is not None else None
        if recorded is not None:
            dk, dv = state.kv_corrections[self.key]
            context, value = recorded
            rows = slice(state.target_rows, None)
            k, v = k.clone(), v.clone()
            k[rows] = k[rows] - context.to(k.dtype) @ dk.to(k.device, k.dtype).T
            v[rows] = v[rows] - value.to(v.dtype) @ dv.to(v.device, v.dtype).T
        if self.inner is not None:
            return self.inner(q, k, v, extra_options)
        return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                                   attn_precision=extra_options.get("attn_precision"),
                                                   transformer_options=extra_options)


class TokenAttention(_Patch):
    """attn2 replace of a cross-attention loss layer: attention written out, keeping the placeholder
    token's map of the recorded rows."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, q, k, v, extra_options):
        state = extra_options.get(STEP_KEY)
        out, probs = rra.attention_with_map(q, k, v, extra_options["n_heads"])
        if state is not None and state.recorded_rows:
            state.token_maps[self.key] = probs[: state.recorded_rows, :, state.placeholder_index]
        return out


def reference_maps(model, concept, layer_keys, reference_latent, reference_context, latent, positive, percent,
                   seed) -> tuple[dict, dict]:
    """One evaluation of the RRA-patched MODEL on ``latent`` (raw, (B, 4, h, w)) noised to ``percent`` of the
    schedule, through ComfyUI's sampler; returns the reference attention maps {layer: (B, N, M)} and the
    gates M^f {layer: (B, N)} of ``layer_keys``."""
    from .sampling import evaluate_once

    attention = ReferenceAttention(concept, layer_keys, reference_latent, reference_context,
                                   ReferenceSettings(cache=False))
    patched = attention.patch(model, record=layer_keys)
    evaluate_once(patched, positive, latent, percent, seed)
    run = run_log(patched).last
    return run.reference_maps, run.gates
