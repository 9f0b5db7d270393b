"""Training a concept: FDTE (§3.2, Eq. 5), MGDP (§3.3, Eq. 6-7), RRA with L_ra (§3.4, Eq. 8-10).

One step, for a batch of photos of the subject (and optionally class images for prior preservation):

1. ``draw_batch``: per sample, the branch low / high / original with probabilities (p_l, p_h, p_o)
   (Eq. 5); its latent is the VAE latent of the photo's low band, high band or the photo itself
   (``batch_latents``), and the placeholder token's embedding is S*_LF, S*_HF or S*_LF + S*_HF;
2. ``masked_noising``: noise at a uniform timestep t, the background kept clean:
   z'_t = M z_t + (1 - M) z_0 with the dilated subject mask M at latent size (Eq. 6);
3. ``reference_pass``: another photo of the subject, augmented by scale / paste / crop, goes through
   the frozen base UNet at t - offset (the authors: 2) with the same noise; its self-attention
   inputs feed RRA;
4. ``text_context``: the instance prompt with the branch's embedding at the placeholder (with ICO:
   the photo's own learnable context tokens around it, DCI/ICO Eq. 2);
5. ``losses``: the masked MSE of the noise prediction (Eq. 7) + lambda_ra L_ra (Eq. 10)
   + lambda_ca (cross-attention mask loss, the authors' code) + lambda_prior MSE on the class images
   (+ eta L_PureCC against ``purecc_target``, PureCC's pure-learning loss in epsilon form).

Two options come from the related methods (shared/notes/related-methods.md): ICO, image-specific context
optimisation (DCI/ICO, ECCV 2024, §2.2), and PureCC's pure-learning loss (§1.2, §1.5). Both are off in
every preset.

The model is reached through the small ``DiffusionBackend`` interface, so the step runs under
ComfyUI (``nodes/comfyui/training.py``) and in plain tests alike. All randomness of a step comes from a
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
    filter_shape: str = "box"             # frequency split of the photos (eqdiff_core.frequency)
    filter_profile: str = "ideal"
    grayscale: bool = True
    band_output: str = "magnitude"
    low_cutoff_bins: float = 50.0         # FFT bins on a 512 grid, scaled to the training resolution
    high_cutoff_bins: float = 5.0
    init_token: str = "ktn"               # both embeddings start as this vocabulary entry's row (rare)
    # what is trained
    train_kv: bool = True                 # cross-attention K/V of every layer (Custom Diffusion)
    train_rra: bool = True
    detach_start_token: bool = True       # no gradient through the start token's K/V (Custom Diffusion)
    rra_layers: str = "middle+output"
    # MGDP (Eq. 6-7)
    mask_noise: bool = True               # Eq. 6
    masked_loss: bool = True              # Eq. 7
    masked_loss_normalisation: str = "mask_area"  # Eq. 7 divided by sum(M) (authors) or by C sum(M)
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
    class_prompt: str = "{class_word}"    # the class images' prompt (the authors: train.sh's INIT_TOKEN)
    reference_prompt: str = "instance"    # the photos' reference pass reads the instance prompt or the class prompt
    inference_reference_prompt: str = "photo of a {class_word}"  # stored in the concept for the RRA Patch
    # ICO (DCI/ICO Eq. 2): per photo and branch, M context tokens before the concept and L after it;
    # off with M = L = 0. The concept itself is one token per band here (S = 1).
    ico_prefix_tokens: int = 0            # M (the authors: 4 alone, 1 for models meant for DCI)
    ico_suffix_tokens: int = 0            # L (the authors: 2 alone, 1 for DCI)
    ico_lr_multiplier: float = 10.0       # the contexts' learning rate over the others' (the authors: 10x)
    ico_prefix_init: str = "a photo of a"  # the prefix contexts start as this text's last M tokens
    ico_suffix_init: str = "."            # the suffix contexts start as this text's first L tokens
    # PureCC (notes §1.2, §1.5): L = L_CC + eta || eps(y) - [eps_base + lambda (eps_ext(y_tgt) - eps_ext(0))] ||^2
    purecc_weight: float = 0.0            # eta; 0 = off (the authors' code: 2)
    purecc_lambda: float = 1.0            # lambda (the authors' code: fixed 1)
    purecc_extractor: str = "concept"     # eps_ext: the Stage-1 concept's K/V and token (the paper) or its token
                                          # on the base weights ("token_only", the released code)
    purecc_base: str = "trained"          # eps_base: the trained model (the paper) or the frozen base (supp. §61)
    purecc_base_prompt: str = "photo of a {class_word}"  # y_base: the prompt without the subject
    purecc_masked: bool = True            # the PureCC term counts inside the MGDP mask, as Eq. 7

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
        for name in ("ico_prefix_tokens", "ico_suffix_tokens"):
            if not 0 <= getattr(self, name) <= 16:
                raise ValueError(f"{name} must be between 0 and 16 (the authors use 1 to 4), got {getattr(self, name)}")
        if self.ico_prefix_tokens and not self.ico_prefix_init.strip():
            raise ValueError("ico_prefix_init must hold a word to start the prefix contexts from (e.g. 'a photo of a')")
        if self.ico_suffix_tokens and not self.ico_suffix_init.strip():
            raise ValueError("ico_suffix_init must hold a word to start the suffix contexts from (e.g. '.')")
        if not (self.ico_lr_multiplier > 0 and math.isfinite(self.ico_lr_multiplier)):
            raise ValueError(f"ico_lr_multiplier must be positive (the authors: 10), got {self.ico_lr_multiplier}")
        if not (self.purecc_weight >= 0 and math.isfinite(self.purecc_weight)):
            raise ValueError(f"purecc_weight must be >= 0 (0 = off, the authors: 2), got {self.purecc_weight}")
        if not math.isfinite(self.purecc_lambda):
            raise ValueError(f"purecc_lambda must be a finite number (the authors: 1), got {self.purecc_lambda}")
        for name in ("class_prompt", "inference_reference_prompt", "purecc_base_prompt"):
            if "{token}" in getattr(self, name):
                raise ValueError(f"{name} must not contain {{token}} (it is a plain prompt), got {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def ico_contexts(self) -> int:
        """M + L, the context tokens per photo and branch (0: ICO off)."""
        return self.ico_prefix_tokens + self.ico_suffix_tokens

    @property
    def purecc(self) -> bool:
        return self.purecc_weight > 0


# the settings that take one of a few values
CHOICES = {
    "filter_shape": frequency.SHAPES, "filter_profile": frequency.PROFILES, "band_output": frequency.OUTPUTS,
    "rra_layers": tuple(rra.RRA_LAYER_SETS), "ra_loss_form": rra.LOSS_FORMS,
    "masked_loss_normalisation": ("mask_area", "elements"), "reference_prompt": ("instance", "class"),
    "purecc_extractor": ("concept", "token_only"), "purecc_base": ("trained", "frozen"),
}

# the knobs of ICO and PureCC (off in every preset): optional inputs of the options node, so that graphs
# saved before they existed keep validating
RELATED_METHOD_SETTINGS = frozenset({
    "ico_prefix_tokens", "ico_suffix_tokens", "ico_lr_multiplier", "ico_prefix_init", "ico_suffix_init",
    "purecc_weight", "purecc_lambda", "purecc_extractor", "purecc_base", "purecc_base_prompt", "purecc_masked"})

PRESETS = {
    # what produced the paper's numbers (eqdiff-method.md), without the code's defects
    "official": TrainingSettings(),
    # the paper's text: circular filter on colour images with signed bands, reference at t, L_ra as
    # the norm of Eq. 10, no cross-attention loss, branches only for the subject's photos
    "paper": TrainingSettings(branches_on_prior=False, filter_shape="circle", grayscale=False,
                              band_output="signed", reference_timestep_offset=0, ra_loss_form="paper",
                              cross_attention_loss_weight=0.0, masked_loss_normalisation="elements",
                              class_prompt="photo of a {class_word}", reference_prompt="class"),
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


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               normalisation: str = "mask_area") -> torch.Tensor:
    """Eq. 7: per sample sum_{c,h,w} M (eps_hat - eps)^2 divided by sum_{h,w} M (``mask_area``, the
    authors' code) or by C sum_{h,w} M (``elements``: a per-element mean inside the mask), averaged
    over the batch; (B, C, h, w), (B, C, h, w), (B, 1, h, w) -> scalar. Outside M the prediction has
    no influence."""
    err = (prediction.float() - target.float()) ** 2 * mask
    area = mask.flatten(1).sum(1) * (prediction.shape[1] if normalisation == "elements" else 1)
    return (err.flatten(1).sum(1) / area.clamp_min(1e-8)).mean()


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


ICO_STATE = "ico_contexts"  # the contexts' key in a concept's training state (resume only)


class ConceptParameters(nn.Module):
    """The tensors a concept learns: S*_LF, S*_HF (D,), K/V deltas keyed by UNet weight name, and RRA
    layers keyed by layer (``output.3.0``); with ICO also the throw-away contexts (3, N, M + L, D): one
    set per branch (LOW, HIGH, ORIGINAL: three different images of each photo) and photo, prefix first."""

    def __init__(self, token_lf: torch.Tensor, token_hf: torch.Tensor, kv_deltas: dict[str, torch.Tensor],
                 rra_layers: dict[str, rra.RRALayer], contexts: torch.Tensor | None = None):
        super().__init__()
        self.token_lf = nn.Parameter(token_lf.detach().float().clone())
        self.token_hf = nn.Parameter(token_hf.detach().float().clone())
        self.kv = nn.ParameterDict({_param_name(k): nn.Parameter(v.detach().float().clone())
                                    for k, v in kv_deltas.items()})
        self.rra = nn.ModuleDict({_param_name(k): layer.float() for k, layer in rra_layers.items()})
        self.contexts = None if contexts is None else nn.Parameter(contexts.detach().float().clone())
        self.kv_keys = list(kv_deltas)
        self.rra_keys = list(rra_layers)

    def kv_delta(self, key: str) -> torch.Tensor:
        return self.kv[_param_name(key)]

    def rra_layer(self, key: str) -> rra.RRALayer:
        return self.rra[_param_name(key)]

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The text-side tensors: the two embeddings and the ICO contexts (not clipped)."""
        return [self.token_lf, self.token_hf, *([] if self.contexts is None else [self.contexts])]

    def clipped_parameters(self) -> list[nn.Parameter]:
        return [*self.kv.values(), *self.rra.parameters()]

    @classmethod
    def from_concept(cls, concept: Concept) -> "ConceptParameters":
        """The concept's tensors; ICO contexts come from its training state when it kept them."""
        layers = {}
        for key, p in concept.rra.items():
            layer = rra.RRALayer(p["to_k_res"].shape[0])
            layer.load_state_dict({"to_k_res.weight": p["to_k_res"], "to_v_res.weight": p["to_v_res"],
                                   "h_r.weight": p["h_r.weight"], "h_r.bias": p["h_r.bias"]})
            layers[key] = layer
        return cls(concept.token_lf, concept.token_hf, concept.kv_deltas, layers, concept.training_state.get(ICO_STATE))

    def to_concept(self, metadata: dict, reference_context: torch.Tensor | None = None) -> Concept:
        """The concept as inference uses it: the ICO contexts are not part of it (see ``optimizer_state``)."""
        cpu = lambda t: t.detach().to("cpu", torch.float32).clone()  # noqa: E731
        layers = {k: {"to_k_res": cpu(self.rra_layer(k).to_k_res.weight), "to_v_res": cpu(self.rra_layer(k).to_v_res.weight),
                      "h_r.weight": cpu(self.rra_layer(k).h_r.weight), "h_r.bias": cpu(self.rra_layer(k).h_r.bias)}
                  for k in self.rra_keys}
        return Concept(cpu(self.token_lf), cpu(self.token_hf), {k: cpu(self.kv_delta(k)) for k in self.kv_keys},
                       layers, None if reference_context is None else cpu(reference_context), dict(metadata))


def make_optimizer(params: ConceptParameters, learning_rate: float, settings: TrainingSettings) -> torch.optim.AdamW:
    """AdamW over every trained tensor; the ICO contexts at ``ico_lr_multiplier`` x the learning rate
    (the DCI/ICO code: 10x)."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    on_cuda = all(p.is_cuda for p in params.parameters())
    groups = [{"params": [p for name, p in params.named_parameters() if name != "contexts"]}]
    if params.contexts is not None:
        groups.append({"params": [params.contexts], "lr": learning_rate * settings.ico_lr_multiplier})
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=settings.weight_decay, fused=on_cuda or None)


def optimizer_state(optimizer: torch.optim.Optimizer, params: ConceptParameters) -> dict[str, torch.Tensor]:
    """What resuming needs beside the concept: AdamW's moments by parameter name, and the ICO contexts
    (they are no part of the concept and never reach inference)."""
    out = {}
    for name, p in params.named_parameters():
        state = optimizer.state.get(p)
        if state:
            out[f"{name}.exp_avg"] = state["exp_avg"].detach().cpu().clone()
            out[f"{name}.exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().clone()
            out[f"{name}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1).cpu()
    if params.contexts is not None:
        out[ICO_STATE] = params.contexts.detach().to("cpu", torch.float32).clone()
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
    prior_latents: (P, 3, 4, h, w) class images per branch, or None;
    extractor_tokens: (2, D) S*_LF, S*_HF of PureCC's Stage-1 concept (the extractor), or None.
    """

    latents: torch.Tensor
    loss_masks: torch.Tensor
    subject_masks: torch.Tensor
    canvas: torch.Tensor
    prior_latents: torch.Tensor | None = None
    extractor_tokens: torch.Tensor | None = None

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

    def ico_context(self, embeddings: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """ICO's prompt (DCI/ICO Eq. 2) [I]_1..M S* <class word> [I]_M+1..M+L per row, the placeholder set to
        ``embeddings`` and the contexts to ``contexts``: (n, D), (n, M + L, D) -> (n, L, D). ICO only."""

    def purecc_contexts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PureCC's fixed prompts: y_base (``purecc_base_prompt``) and the empty prompt, (1, L, D) each."""

    def frozen_prediction(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                          weights: str) -> torch.Tensor:
        """A noise prediction (B, 4, h, w) without the reference (RRA idle) through frozen weights: ``base``
        (the base UNet) or ``extractor`` (the base UNet with PureCC's Stage-1 K/V deltas). Run under no_grad."""

    def class_context(self) -> torch.Tensor:
        """The class prompt's context (1, L, D), fixed."""

    def reference_context(self) -> torch.Tensor:
        """The context of the reference pass for the subject's photos (1, L, D), fixed."""

    def reference_features(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor):
        """A pass of the frozen base UNet over reference latents; returns what ``predict`` reads."""

    def predict(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, reference,
                recorded_rows: int) -> StepOutput:
        """The trained UNet's noise prediction; attention maps are recorded for the first rows."""


@dataclass
class Batch:
    """What one step trains on: ``photos`` (B,) indices of the subject's photos and their ``branches``
    (B,) drawn by Eq. 5; ``priors`` (P,) indices of class images and their branches (P = 0 without
    prior preservation)."""

    photos: torch.Tensor
    branches: torch.Tensor
    priors: torch.Tensor
    prior_branches: torch.Tensor

    @property
    def size(self) -> int:
        return self.photos.shape[0]

    @property
    def rows(self) -> int:
        return self.photos.shape[0] + self.priors.shape[0]


@dataclass
class LossParts:
    """The loss of one step and its terms, detached (None where a term is off)."""

    total: torch.Tensor
    denoise: torch.Tensor                              # Eq. 7
    prior: torch.Tensor | None = None                  # prior preservation on the class images
    reference_attention: torch.Tensor | None = None    # L_ra, Eq. 10
    cross_attention: torch.Tensor | None = None        # the placeholder's cross-attention mask loss
    purecc: torch.Tensor | None = None                 # L_PureCC, unweighted

    def values(self) -> dict[str, float]:
        """{"loss": total, term: value} as floats, for logs and the loss history."""
        terms = {"loss": self.total, "denoise": self.denoise, "prior": self.prior, "ra": self.reference_attention,
                 "cross_attention": self.cross_attention, "purecc": self.purecc}
        return {k: float(v) for k, v in terms.items() if v is not None}


def step_generator(seed: int, step: int) -> torch.Generator:
    """The step's own random stream: a function of (seed, step) only."""
    return torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))


def draw_batch(data: TrainingData, settings: TrainingSettings, batch_size: int, generator: torch.Generator) -> Batch:
    """Step 1: the photos (without repeats while there are enough), as many class images for prior
    preservation, and each sample's branch, Eq. 5 (class images: ORIGINAL unless ``branches_on_prior``)."""
    n = data.photos
    photos = (torch.randperm(n, generator=generator)[:batch_size] if batch_size <= n
              else torch.randint(0, n, (batch_size,), generator=generator))
    n_prior = 0 if data.prior_latents is None or settings.prior_loss_weight == 0 else batch_size
    priors = torch.randint(0, data.prior_latents.shape[0], (n_prior,), generator=generator) if n_prior \
        else torch.zeros(0, dtype=torch.long)
    probs = (settings.p_low, settings.p_high, settings.p_original)
    branches = draw_branches(batch_size, probs, generator)
    prior_branches = (draw_branches(n_prior, probs, generator) if settings.branches_on_prior
                      else torch.full((n_prior,), ORIGINAL, dtype=torch.long))
    return Batch(photos, branches, priors, prior_branches)


def batch_latents(data: TrainingData, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent of each sample's branch, (rows, 4, h, w), and its loss mask (rows, 1, h, w): the
    dilated subject mask for photos, all ones for class images."""
    device = data.latents.device
    z0 = data.latents[batch.branches.to(device), batch.photos.to(device)]
    masks = data.loss_masks[batch.photos.to(device)]
    if batch.priors.numel():
        z0 = torch.cat([z0, data.prior_latents[batch.priors.to(device), batch.prior_branches.to(device)]])
        masks = torch.cat([masks, torch.ones_like(masks[:1]).expand(batch.priors.numel(), -1, -1, -1)])
    return z0, masks


def masked_noising(z0: torch.Tensor, masks: torch.Tensor, alphas_cumprod: torch.Tensor, settings: TrainingSettings,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 2: a uniform timestep and noise per sample; the subject is noised and the background kept
    clean, z'_t = M z_t + (1 - M) z_0 (Eq. 6). Returns (timesteps (rows,), noise, z'_t)."""
    timesteps = torch.randint(0, alphas_cumprod.shape[0], (z0.shape[0],), generator=generator)
    noise = torch.randn(z0.shape, generator=generator).to(z0.device, z0.dtype)
    z_t = noisy_latent(z0, noise, alphas_cumprod[timesteps.to(z0.device)])
    if settings.mask_noise:
        z_t = mask_guided_latent(z_t, z0, masks)
    return timesteps.to(z0.device), noise, z_t


def reference_latents(data: TrainingData, batch: Batch, settings: TrainingSettings,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3a: each photo's reference is another photo of the subject (itself when there is one), each
    class image's its own flipped copy, augmented by scale / paste / crop; (rows, 4, h, w) and the
    references' subject masks (B, 1, h, w) for the photos."""
    n = data.photos
    latents, masks = [], []
    for photo in batch.photos.tolist():
        others = [j for j in range(n) if j != photo] or [photo]
        other = others[int(torch.randint(0, len(others), (1,), generator=generator))]
        lat, m = data.latents[ORIGINAL, other], data.subject_masks[other]
        if settings.reference_augment:
            lat, m = augment_reference(lat, m, data.canvas, generator)
        latents.append(lat)
        masks.append(m)
    for j in batch.priors.tolist():
        lat, m = data.prior_latents[j, ORIGINAL], torch.ones_like(data.subject_masks[0])
        if settings.reference_augment:
            lat, m = augment_reference(lat, m, data.canvas, generator, flip=True)
        latents.append(lat)
    return torch.stack(latents), torch.stack(masks)


def reference_pass(backend: DiffusionBackend, data: TrainingData, batch: Batch, timesteps: torch.Tensor,
                   noise: torch.Tensor, settings: TrainingSettings, generator: torch.Generator):
    """Step 3: the references through the frozen base UNet at t - offset with the samples' own noise
    (the authors: offset 2); the photos' references read ``reference_context``, the class images' the
    class prompt. Returns (what ``predict`` reads, the references' subject masks (B, 1, h, w))."""
    ref_z0, ref_masks = reference_latents(data, batch, settings, generator)
    ref_t = (timesteps - settings.reference_timestep_offset).clamp_min(0)
    ref_x = noisy_latent(ref_z0, noise, backend.alphas_cumprod[ref_t])
    context = [backend.reference_context().expand(batch.size, -1, -1)]
    if batch.priors.numel():
        context.append(backend.class_context().expand(batch.priors.numel(), -1, -1))
    with torch.no_grad():
        return backend.reference_features(ref_x, ref_t, torch.cat(context)), ref_masks


def text_context(params: "ConceptParameters", backend: DiffusionBackend, batch: Batch) -> torch.Tensor:
    """Step 4: the instance prompt with S*_LF, S*_HF or S*_LF + S*_HF at the placeholder per photo
    (Eq. 5; each distinct branch encoded once); with ICO each photo's prompt carries the contexts of its
    (branch, photo), so each row is encoded on its own (DCI/ICO Eq. 2). The class images keep the plain
    class prompt; (rows, L, D)."""
    token = branch_embeddings(params.token_lf, params.token_hf, batch.branches)
    if params.contexts is not None:
        contexts = params.contexts[batch.branches.to(token.device), batch.photos.to(token.device)]  # (B, M + L, D)
        context = backend.ico_context(token, contexts)
    else:
        unique = batch.branches.unique()
        encoded = backend.instance_context(token[[int((batch.branches == b).nonzero()[0]) for b in unique.tolist()]])
        context = encoded[torch.searchsorted(unique, batch.branches).to(encoded.device)]
    if batch.priors.numel():
        context = torch.cat([context, backend.class_context().to(context.dtype).expand(batch.priors.numel(), -1, -1)])
    return context


def purecc_target(backend: DiffusionBackend, data: TrainingData, batch: Batch, z_t: torch.Tensor,
                  timesteps: torch.Tensor, settings: TrainingSettings) -> torch.Tensor:
    """PureCC's decoupled target for the photos' rows (notes §1.2, §1.5 in epsilon form):
    eps_base + lambda (eps_ext(z_t, y_tgt) - eps_ext(z_t, empty)), (B, 4, h, w).

    eps_base: the trained model on y_base, with gradients (the paper), or the frozen base UNet without
    (``purecc_base = frozen``, supp. §61). The extractor is PureCC's frozen Stage-1 model: y_tgt is the
    instance prompt with the Stage-1 embedding of each row's branch, run through the Stage-1 K/V
    (``concept``, the paper) or the base weights (``token_only``, the released code); no gradients.
    These passes have no reference photo (RRA idle): y_base and the empty prompt name no subject."""
    if data.extractor_tokens is None:
        raise ValueError("PureCC needs its extractor (the Stage-1 concept); none was given")
    b = batch.size
    x, t = z_t[:b], timesteps[:b]
    base_context, empty_context = backend.purecc_contexts()
    base_context = base_context.expand(b, -1, -1)
    if settings.purecc_base == "trained":
        eps_base = backend.predict(x, t, base_context, None, recorded_rows=0).noise
    else:
        with torch.no_grad():
            eps_base = backend.frozen_prediction(x, t, base_context, "base")
    tokens = data.extractor_tokens
    with torch.no_grad():
        target_context = backend.instance_context(branch_embeddings(tokens[0], tokens[1], batch.branches))
        both = backend.frozen_prediction(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([target_context, empty_context.expand(b, -1, -1)]),
            "extractor" if settings.purecc_extractor == "concept" else "base")
    eps_target, eps_empty = both[:b], both[b:]
    return eps_base + settings.purecc_lambda * (eps_target - eps_empty)


def _resize_tokens(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, 1, h, w) -> (B, tokens) by nearest resizing to the map of the attention layer."""
    return F.interpolate(mask, size=rra.grid_size(tokens, *mask.shape[-2:]), mode="nearest").flatten(1)


def losses(out: StepOutput, noise: torch.Tensor, masks: torch.Tensor, subject: torch.Tensor,
           reference_masks: torch.Tensor | None, batch: Batch, settings: TrainingSettings,
           purecc: torch.Tensor | None = None) -> tuple[torch.Tensor, LossParts]:
    """Step 5: Eq. 7 on the photos + prior loss on the class images + lambda_ra L_ra (Eq. 10) +
    lambda_ca the cross-attention mask loss (+ eta L_PureCC when ``purecc``, the photos' PureCC target
    (B, 4, h, w), is given). ``subject``: the photos' undilated masks (B, 1, h, w).

    L_PureCC is Eq. 7's form with the PureCC target in place of the noise: the same normalisation, inside
    the MGDP mask when ``purecc_masked`` (``elements`` without a mask is the authors' plain MSE)."""
    b = batch.size
    inst_mask = masks[:b] if settings.masked_loss else torch.ones_like(masks[:b])
    loss = denoise = masked_mse(out.noise[:b], noise[:b], inst_mask, settings.masked_loss_normalisation)  # Eq. 7
    parts = {}
    if purecc is not None:
        purecc_mask = masks[:b] if settings.purecc_masked else torch.ones_like(masks[:b])
        parts["purecc"] = masked_mse(out.noise[:b], purecc, purecc_mask, settings.masked_loss_normalisation)
        loss = loss + settings.purecc_weight * parts["purecc"]
    if batch.priors.numel():
        parts["prior"] = F.mse_loss(out.noise[b:].float(), noise[b:].float())
        loss = loss + settings.prior_loss_weight * parts["prior"]
    if out.reference_attention is not None and reference_masks is not None and settings.ra_loss_weight > 0:
        a = out.reference_attention.float()
        parts["reference_attention"] = rra.reference_attention_loss(  # Eq. 10
            a, _resize_tokens(reference_masks, a.shape[2]), _resize_tokens(subject, a.shape[1]), settings.ra_loss_form)
        loss = loss + settings.ra_loss_weight * parts["reference_attention"]
    if out.token_attention is not None and settings.cross_attention_loss_weight > 0:
        parts["cross_attention"] = cross_attention_mask_loss(out.token_attention,
                                                             _resize_tokens(subject, out.token_attention.shape[1]))
        loss = loss + settings.cross_attention_loss_weight * parts["cross_attention"]
    return loss, LossParts(loss.detach(), denoise.detach(), **{k: v.detach() for k, v in parts.items()})


def training_step(params: ConceptParameters, backend: DiffusionBackend, data: TrainingData,
                  settings: TrainingSettings, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, LossParts, Batch]:
    """The loss of one step (before backward), its parts and the batch it trained on."""
    batch = draw_batch(data, settings, batch_size, generator)
    z0, masks = batch_latents(data, batch)
    timesteps, noise, z_t = masked_noising(z0, masks, backend.alphas_cumprod, settings, generator)
    reference, reference_masks = None, None
    if settings.train_rra and params.rra_keys:
        reference, reference_masks = reference_pass(backend, data, batch, timesteps, noise, settings, generator)
    out = backend.predict(z_t, timesteps, text_context(params, backend, batch), reference, recorded_rows=batch.size)
    target = purecc_target(backend, data, batch, z_t, timesteps, settings) if settings.purecc else None
    subject = data.subject_masks[batch.photos.to(data.latents.device)]
    loss, parts = losses(out, noise, masks, subject, reference_masks, batch, settings, target)
    return loss, parts, batch


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
        loss, parts, batch = training_step(params, backend, data, settings, batch_size, step_generator(seed, step))
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
        values = parts.values()
        values["branches"] = batch.branches.tolist()
        losses.append(values["loss"])
        if on_step is not None:
            on_step(step, values)
    return losses
