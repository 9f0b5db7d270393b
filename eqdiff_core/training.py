"""Training a concept: FDTE (§3.2, Eq. 5), MGDP (§3.3, Eq. 6-7), RRA with L_ra (§3.4, Eq. 8-10).

One step, for a batch of photos of the subject (and optionally class images for prior preservation):

1. per sample, draw the branch low / high / original with probabilities (p_l, p_h, p_o) (Eq. 5);
   its latent is the VAE latent of the photo's low band, high band or the photo itself, and the
   placeholder token's embedding is S*_LF, S*_HF or S*_LF + S*_HF;
2. noise it at a uniform timestep t and keep the background clean: z'_t = M z_t + (1 - M) z_0 with
   the dilated subject mask M at latent size (Eq. 6);
3. another photo of the subject, augmented by scale / paste / crop, goes through the frozen base
   UNet at t - offset (the authors: 2) with the same noise; its self-attention inputs feed RRA;
4. loss = masked MSE of the noise prediction (Eq. 7, a per-element mean inside M)
   + lambda_ra L_ra (Eq. 10) + lambda_ca (cross-attention mask loss, the authors' code)
   + lambda_prior MSE on the class images.

The model is reached through the small ``DiffusionBackend`` interface, so the step runs under
ComfyUI (``nodes/glue.py``) and in plain tests alike. All randomness of a step comes from a
generator seeded by (seed, step): a run resumed at step k draws what an uninterrupted run draws.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import frequency, rra
from .concept import Concept

LOW, HIGH, ORIGINAL = 0, 1, 2  # branch ids, as in the authors' code
BRANCH_NAMES = ("low", "high", "original")


# -- settings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingSettings:
    """Every knob of a training run. ``PRESETS`` holds the authors' code and the paper's text."""

    # FDTE (Eq. 5)
    p_low: float = 0.1
    p_high: float = 0.1
    p_original: float = 0.8
    branches_on_prior: bool = True        # the authors' code also draws branches for class images
    filter_shape: str = "square"          # frequency split of the photos (eqdiff_core.frequency)
    filter_profile: str = "ideal"
    grayscale: bool = True
    band_output: str = "magnitude"
    low_cutoff_bins: float = 50.0         # FFT bins on a 512 grid, scaled to the training resolution
    high_cutoff_bins: float = 5.0
    init_token: str = "ktn"               # both embeddings start as this (rare) token's embedding
    # what is trained
    train_kv: bool = True                 # cross-attention K/V of every layer (Custom Diffusion)
    train_rra: bool = True
    rra_layers: str = "middle+output"
    # MGDP (Eq. 6-7)
    mask_noise: bool = True               # Eq. 6
    masked_loss: bool = True              # Eq. 7
    dilate_iterations: int = 5            # 5x5 max-pool dilations at latent size
    dilate_kernel: int = 5
    # reference
    reference_timestep_offset: int = 2    # the reference is noised at t - offset (paper: t)
    reference_augment: bool = True
    # losses
    ra_loss_weight: float = 0.1
    ra_loss_form: str = "official"
    cross_attention_loss_weight: float = 0.1
    prior_loss_weight: float = 1.0
    # optimiser (AdamW, constant learning rate)
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0            # over K/V and RRA; the token embeddings are not clipped
    # data
    resolution: int = 512                 # photos are resized to resolution x resolution
    # prompts
    prompt_template: str = "photo of a {token} {class_word}"
    class_prompt: str = "photo of a {class_word}"

    def validate(self) -> "TrainingSettings":
        probs = (self.p_low, self.p_high, self.p_original)
        if min(probs) < 0 or sum(probs) <= 0:
            raise ValueError(f"p_low, p_high, p_original must be >= 0 and not all 0, got {probs}")
        if self.dilate_iterations < 0 or self.dilate_kernel < 1 or self.dilate_kernel % 2 == 0:
            raise ValueError("dilate_iterations must be >= 0 and dilate_kernel an odd number >= 1, got "
                             f"{self.dilate_iterations} and {self.dilate_kernel}")
        if self.reference_timestep_offset < 0:
            raise ValueError(f"reference_timestep_offset must be >= 0, got {self.reference_timestep_offset}")
        for name in ("ra_loss_weight", "cross_attention_loss_weight", "prior_loss_weight", "weight_decay",
                     "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.low_cutoff_bins > 0 and self.high_cutoff_bins > 0):
            raise ValueError("low_cutoff_bins and high_cutoff_bins must be positive")
        if self.resolution < 64 or self.resolution % 64:
            raise ValueError(f"resolution must be a multiple of 64 (e.g. 512), got {self.resolution}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if "{token}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{token}}, got {self.prompt_template!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# the settings that take one of a few values
CHOICES = {
    "filter_shape": frequency.SHAPES, "filter_profile": frequency.PROFILES, "band_output": frequency.OUTPUTS,
    "rra_layers": tuple(rra.RRA_LAYER_SETS), "ra_loss_form": rra.LOSS_FORMS,
}

PRESETS = {
    # what produced the paper's numbers (eqdiff-method.md), without the code's defects
    "official": TrainingSettings(),
    # the paper's text: circular filter on colour images with signed bands, reference at t, L_ra as
    # the norm of Eq. 10, no cross-attention loss, branches only for the subject's photos
    "paper": TrainingSettings(branches_on_prior=False, filter_shape="circle", grayscale=False,
                              band_output="signed", reference_timestep_offset=0, ra_loss_form="paper",
                              cross_attention_loss_weight=0.0),
}


def settings_for(preset: str, **overrides) -> TrainingSettings:
    """A preset with some knobs overridden; unknown names and bad values raise ValueError."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    names = {f.name for f in fields(TrainingSettings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown training settings: {', '.join(unknown)}")
    return replace(PRESETS[preset], **overrides).validate()


# -- FDTE ----------------------------------------------------------------------------------------
def draw_branches(count: int, probabilities: tuple[float, float, float], generator: torch.Generator) -> torch.Tensor:
    """Eq. 5: per sample LOW, HIGH or ORIGINAL with probabilities (p_l, p_h, p_o); (count,) long."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    p = torch.tensor(probabilities, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), count, replacement=True, generator=generator)


def branch_embeddings(token_lf: torch.Tensor, token_hf: torch.Tensor, branches: torch.Tensor) -> torch.Tensor:
    """The placeholder's embedding per sample: S*_LF, S*_HF or S*_ori = S*_LF + S*_HF; (D,) x2, (n,) -> (n, D)."""
    table = torch.stack([token_lf, token_hf, token_lf + token_hf])
    return table[branches.to(table.device)]


def frequency_bands(images: torch.Tensor, settings: TrainingSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The low and high band of photos in [-1, 1], (B, 3, H, W) -> two (B, 3, H, W). The cutoffs are
    bins on a 512 grid (the authors' 50 and 5); as fractions of Nyquist they hold at any size."""
    return frequency.frequency_split(
        images, frequency.bins_to_cutoff(settings.low_cutoff_bins, 512),
        frequency.bins_to_cutoff(settings.high_cutoff_bins, 512),
        shape=settings.filter_shape, profile=settings.filter_profile, grayscale=settings.grayscale,
        output=settings.band_output)


# -- MGDP ----------------------------------------------------------------------------------------
def latent_mask(mask: torch.Tensor, size: tuple[int, int], dilate_iterations: int = 0, kernel: int = 5) -> torch.Tensor:
    """A subject mask at latent size: area-downsampled, then dilated ``dilate_iterations`` times with a
    ``kernel`` x ``kernel`` max-pool (the authors: 5 times 5x5). (B, H, W) in [0, 1] -> (B, 1, h, w)."""
    m = F.interpolate(mask[:, None].float(), size=size, mode="area")
    for _ in range(dilate_iterations):
        m = F.max_pool2d(F.pad(m, [kernel // 2] * 4, mode="replicate"), kernel, stride=1)
    return m


def noisy_latent(z0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps; (B, C, h, w), (B, C, h, w), (B,) -> (B, C, h, w)."""
    a = alpha_bar.view(-1, 1, 1, 1).to(z0.dtype)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def mask_guided_latent(z_t: torch.Tensor, z0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 6: z'_t = M z_t + (1 - M) z_0: the subject noised, the background clean; mask (B, 1, h, w)."""
    return mask * z_t + (1 - mask) * z0


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 7 as a per-element mean inside the mask: sum(M (eps_hat - eps)^2) / (C sum(M)) per sample,
    averaged over the batch; (B, C, h, w), (B, C, h, w), (B, 1, h, w) -> scalar. Outside M the
    prediction has no influence."""
    err = (prediction.float() - target.float()) ** 2 * mask
    per_sample = err.flatten(1).sum(1) / (mask.flatten(1).sum(1) * prediction.shape[1]).clamp_min(1e-8)
    return per_sample.mean()


def cross_attention_mask_loss(token_attention: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """The authors' cross-attention loss: the placeholder token's attention map, divided by its maximum,
    should match the subject mask. (B, N) and (B, N) -> scalar MSE."""
    normalised = token_attention / token_attention.amax(dim=1, keepdim=True).clamp_min(1e-8)
    return F.mse_loss(normalised.float(), target_mask.float())


# -- reference augmentation ------------------------------------------------------------------------
def augment_reference(latent: torch.Tensor, mask: torch.Tensor, canvas: torch.Tensor,
                      generator: torch.Generator, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' reference augmentation, applied at latent size: with p = 0.66 shrink to
    s in [170/512, 1] of the side and paste at a random place on the canvas (the latent of an empty
    mid-grey image), else enlarge to s in [614/512, 715/512] and crop at random. ``flip`` adds a
    random horizontal flip (the class images' reference).
    latent (C, h, w), mask (1, h, w), canvas (C, h, w) -> (C, h, w), (1, h, w)."""
    _, h, w = latent.shape
    r = torch.rand(4, generator=generator).tolist()
    if flip and r[3] < 0.5:
        latent, mask = latent.flip(-1), mask.flip(-1)
    if r[0] < 0.66:
        scale = (170 + r[1] * (512 - 170)) / 512
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        small = F.interpolate(latent[None], size=(sh, sw), mode="bilinear", antialias=True, align_corners=False)[0]
        small_mask = F.interpolate(mask[None], size=(sh, sw), mode="nearest")[0]
        top = int(torch.randint(0, h - sh + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - sw + 1, (1,), generator=generator))
        out, out_mask = canvas.clone(), torch.zeros_like(mask)
        out[:, top:top + sh, left:left + sw] = small
        out_mask[:, top:top + sh, left:left + sw] = small_mask
        return out, out_mask
    scale = (614 + r[2] * (715 - 614)) / 512
    bh, bw = round(h * scale), round(w * scale)
    big = F.interpolate(latent[None], size=(bh, bw), mode="bilinear", align_corners=False)[0]
    big_mask = F.interpolate(mask[None], size=(bh, bw), mode="nearest")[0]
    top = int(torch.randint(0, bh - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, bw - w + 1, (1,), generator=generator))
    return big[:, top:top + h, left:left + w], big_mask[:, top:top + h, left:left + w]


# -- the trained tensors ---------------------------------------------------------------------------
def _param_name(key: str) -> str:
    return key.replace(".", "__")


class ConceptParameters(nn.Module):
    """The tensors a concept learns: S*_LF, S*_HF (D,), K/V deltas keyed by UNet weight name, and RRA
    layers keyed by layer (``output.3.0``)."""

    def __init__(self, token_lf: torch.Tensor, token_hf: torch.Tensor, kv_deltas: dict[str, torch.Tensor],
                 rra_layers: dict[str, rra.RRALayer]):
        super().__init__()
        self.token_lf = nn.Parameter(token_lf.detach().float().clone())
        self.token_hf = nn.Parameter(token_hf.detach().float().clone())
        self.kv = nn.ParameterDict({_param_name(k): nn.Parameter(v.detach().float().clone())
                                    for k, v in kv_deltas.items()})
        self.rra = nn.ModuleDict({_param_name(k): layer.float() for k, layer in rra_layers.items()})
        self.kv_keys = list(kv_deltas)
        self.rra_keys = list(rra_layers)

    def kv_delta(self, key: str) -> torch.Tensor:
        return self.kv[_param_name(key)]

    def rra_layer(self, key: str) -> rra.RRALayer:
        return self.rra[_param_name(key)]

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.token_lf, self.token_hf]

    def clipped_parameters(self) -> list[nn.Parameter]:
        return [*self.kv.values(), *self.rra.parameters()]

    @classmethod
    def from_concept(cls, concept: Concept) -> "ConceptParameters":
        layers = {}
        for key, p in concept.rra.items():
            layer = rra.RRALayer(p["to_k_res"].shape[0])
            layer.load_state_dict({"to_k_res.weight": p["to_k_res"], "to_v_res.weight": p["to_v_res"],
                                   "h_r.weight": p["h_r.weight"], "h_r.bias": p["h_r.bias"]})
            layers[key] = layer
        return cls(concept.token_lf, concept.token_hf, concept.kv_deltas, layers)

    def to_concept(self, metadata: dict, reference_context: torch.Tensor | None = None) -> Concept:
        cpu = lambda t: t.detach().to("cpu", torch.float32).clone()  # noqa: E731
        layers = {k: {"to_k_res": cpu(self.rra_layer(k).to_k_res.weight), "to_v_res": cpu(self.rra_layer(k).to_v_res.weight),
                      "h_r.weight": cpu(self.rra_layer(k).h_r.weight), "h_r.bias": cpu(self.rra_layer(k).h_r.bias)}
                  for k in self.rra_keys}
        return Concept(cpu(self.token_lf), cpu(self.token_hf), {k: cpu(self.kv_delta(k)) for k in self.kv_keys},
                       layers, None if reference_context is None else cpu(reference_context), dict(metadata))


def make_optimizer(params: ConceptParameters, learning_rate: float, settings: TrainingSettings) -> torch.optim.AdamW:
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    on_cuda = all(p.is_cuda for p in params.parameters())
    return torch.optim.AdamW(params.parameters(), lr=learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=settings.weight_decay, fused=on_cuda or None)


def optimizer_state(optimizer: torch.optim.Optimizer, params: ConceptParameters) -> dict[str, torch.Tensor]:
    """AdamW's moments by parameter name, to store beside the concept so that training can resume."""
    out = {}
    for name, p in params.named_parameters():
        state = optimizer.state.get(p)
        if state:
            out[f"{name}.exp_avg"] = state["exp_avg"].detach().cpu().clone()
            out[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().clone()
            out[f"{name}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1).cpu()
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, params: ConceptParameters, saved: dict[str, torch.Tensor]) -> None:
    for name, p in params.named_parameters():
        if f"{name}.exp_avg" not in saved:
            continue
        optimizer.state[p] = {
            "step": torch.tensor(float(saved[f"{name}.step"][0])),
            "exp_avg": saved[f"{name}.exp_avg"].to(p.device, p.dtype).clone(),
            "exp_avg_sq": saved[f"{name}.exp_avg_sq"].to(p.device, p.dtype).clone(),
        }


# -- one step --------------------------------------------------------------------------------------
@dataclass
class TrainingData:
    """Everything that does not change between steps, on the training device.

    latents: (3, N, 4, h, w) UNet-space latents of the LOW, HIGH and ORIGINAL photos;
    loss_masks: (N, 1, h, w) dilated subject masks (Eq. 6-7); subject_masks: (N, 1, h, w) undilated,
    for L_ra and the cross-attention loss; canvas: (4, h, w) latent of an empty mid-grey image;
    prior_latents: (P, 3, 4, h, w) class images per branch, or None.
    """

    latents: torch.Tensor
    loss_masks: torch.Tensor
    subject_masks: torch.Tensor
    canvas: torch.Tensor
    prior_latents: torch.Tensor | None = None

    @property
    def photos(self) -> int:
        return self.latents.shape[1]


@dataclass
class StepOutput:
    """What the backend's target pass returns: the noise prediction (B, 4, h, w), the reference
    attention maps of the L_ra layers (B, N, M) averaged over heads and layers, and the placeholder's
    cross-attention map (B, N) averaged likewise (None where not recorded)."""

    noise: torch.Tensor
    reference_attention: torch.Tensor | None = None
    token_attention: torch.Tensor | None = None


class DiffusionBackend(Protocol):
    """The model as the training step sees it."""

    alphas_cumprod: torch.Tensor  # (T,) on the training device

    def instance_context(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The instance prompt's text context with the placeholder set to each row: (n, D) -> (n, L, D)."""

    def class_context(self) -> torch.Tensor:
        """The class prompt's context (1, L, D), fixed."""

    def reference_features(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor):
        """A pass of the frozen base UNet over reference latents; returns what ``predict`` reads."""

    def predict(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, reference,
                recorded_rows: int) -> StepOutput:
        """The trained UNet's noise prediction; attention maps are recorded for the first rows."""


def step_generator(seed: int, step: int) -> torch.Generator:
    """The step's own random stream: a function of (seed, step) only."""
    return torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))


def _resize_tokens(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, 1, h, w) -> (B, tokens) by nearest resizing to the map of the attention layer."""
    return F.interpolate(mask, size=rra.grid_size(tokens, *mask.shape[-2:]), mode="nearest").flatten(1)


def training_step(params: ConceptParameters, backend: DiffusionBackend, data: TrainingData,
                  settings: TrainingSettings, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """The loss of one step (before backward) and its parts (detached scalar tensors; no device sync)."""
    device = data.latents.device
    n_photos = data.photos
    photos = (torch.randperm(n_photos, generator=generator)[:batch_size] if batch_size <= n_photos
              else torch.randint(0, n_photos, (batch_size,), generator=generator))
    n_prior = 0 if data.prior_latents is None or settings.prior_loss_weight == 0 else batch_size
    priors = torch.randint(0, data.prior_latents.shape[0], (n_prior,), generator=generator) if n_prior else None
    probs = (settings.p_low, settings.p_high, settings.p_original)
    branches = draw_branches(batch_size, probs, generator)
    prior_branches = (draw_branches(n_prior, probs, generator) if settings.branches_on_prior
                      else torch.full((n_prior,), ORIGINAL, dtype=torch.long))

    z0 = data.latents[branches.to(device), photos.to(device)]
    masks = data.loss_masks[photos.to(device)]
    if n_prior:
        z0 = torch.cat([z0, data.prior_latents[priors.to(device), prior_branches.to(device)]])
        masks = torch.cat([masks, torch.ones_like(masks[:1]).expand(n_prior, -1, -1, -1)])
    rows = batch_size + n_prior
    timesteps = torch.randint(0, backend.alphas_cumprod.shape[0], (rows,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator).to(device, z0.dtype)
    alpha = backend.alphas_cumprod[timesteps.to(device)]
    z_t = noisy_latent(z0, noise, alpha)
    if settings.mask_noise:
        z_t = mask_guided_latent(z_t, z0, masks)  # Eq. 6

    reference = None
    reference_masks = None
    if settings.train_rra and params.rra_keys:
        ref_latents, ref_masks = [], []
        for i, photo in enumerate(photos.tolist()):
            others = [j for j in range(n_photos) if j != photo] or [photo]
            other = others[int(torch.randint(0, len(others), (1,), generator=generator))]
            lat, m = data.latents[ORIGINAL, other], data.subject_masks[other]
            if settings.reference_augment:
                lat, m = augment_reference(lat, m, data.canvas, generator)
            ref_latents.append(lat)
            ref_masks.append(m)
        for j in (priors.tolist() if n_prior else []):
            lat = data.prior_latents[j, ORIGINAL]
            m = torch.ones_like(data.subject_masks[0])
            if settings.reference_augment:
                lat, m = augment_reference(lat, m, data.canvas, generator, flip=True)
            ref_latents.append(lat)
            ref_masks.append(m)
        ref_z0 = torch.stack(ref_latents)
        reference_masks = torch.stack(ref_masks[:batch_size])
        ref_t = (timesteps - settings.reference_timestep_offset).clamp_min(0)
        ref_x = noisy_latent(ref_z0, noise, backend.alphas_cumprod[ref_t.to(device)])
        with torch.no_grad():
            reference = backend.reference_features(ref_x, ref_t.to(device), backend.class_context().expand(rows, -1, -1))

    token = branch_embeddings(params.token_lf, params.token_hf, branches)
    unique = branches.unique()
    encoded = backend.instance_context(token[[int((branches == b).nonzero()[0]) for b in unique.tolist()]])
    context = encoded[torch.searchsorted(unique, branches).to(encoded.device)]
    if n_prior:
        context = torch.cat([context, backend.class_context().to(context.dtype).expand(n_prior, -1, -1)])

    out = backend.predict(z_t, timesteps.to(device), context, reference, recorded_rows=batch_size)
    parts = {}
    inst_mask = masks[:batch_size] if settings.masked_loss else torch.ones_like(masks[:batch_size])
    loss = masked_mse(out.noise[:batch_size], noise[:batch_size], inst_mask)  # Eq. 7
    parts["denoise"] = loss.detach()
    if n_prior:
        prior = F.mse_loss(out.noise[batch_size:].float(), noise[batch_size:].float())
        loss = loss + settings.prior_loss_weight * prior
        parts["prior"] = prior.detach()
    subject = data.subject_masks[photos.to(device)]
    if out.reference_attention is not None and settings.ra_loss_weight > 0:
        a = out.reference_attention.float()
        l_ra = rra.reference_attention_loss(a, _resize_tokens(reference_masks, a.shape[2]),
                                            _resize_tokens(subject, a.shape[1]), settings.ra_loss_form)  # Eq. 10
        loss = loss + settings.ra_loss_weight * l_ra
        parts["ra"] = l_ra.detach()
    if out.token_attention is not None and settings.cross_attention_loss_weight > 0:
        ca = cross_attention_mask_loss(out.token_attention, _resize_tokens(subject, out.token_attention.shape[1]))
        loss = loss + settings.cross_attention_loss_weight * ca
        parts["cross_attention"] = ca.detach()
    parts["loss"] = loss.detach()
    parts["branches"] = branches
    return loss, parts


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the parameters are those of the last good step."""

    def __init__(self, step: int):
        super().__init__(f"the loss became NaN or infinite at step {step}")
        self.step = step


def train(params: ConceptParameters, backend: DiffusionBackend, data: TrainingData, settings: TrainingSettings,
          optimizer: torch.optim.Optimizer, *, steps: int, batch_size: int, seed: int, start_step: int = 0,
          on_step: Callable[[int, dict], None] | None = None) -> list[float]:
    """Run steps ``start_step`` .. ``steps - 1`` and return their losses. ``on_step(step, parts)`` follows
    each optimiser step; it may raise to stop, and the parameters then hold the state after that step.

    A non-finite loss or gradient raises NonFiniteLoss before the update, so the parameters and the
    optimiser stay at the last good step.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    losses = []
    clipped = params.clipped_parameters()
    max_norm = settings.max_grad_norm if settings.max_grad_norm > 0 else math.inf
    for step in range(start_step, steps):
        loss, parts = training_step(params, backend, data, settings, batch_size, step_generator(seed, step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad.isfinite().all() for p in params.embedding_parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(clipped, max_norm)
        finite = torch.isfinite(loss) & torch.isfinite(norm).to(loss.device)
        if grads:
            finite = finite & torch.stack(grads).all()
        if not bool(finite):  # the one device sync of the step
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(step)
        optimizer.step()
        values = {k: float(v) for k, v in parts.items() if k != "branches"}
        values["branches"] = parts["branches"].tolist()
        losses.append(values["loss"])
        if on_step is not None:
            on_step(step, values)
    return losses
