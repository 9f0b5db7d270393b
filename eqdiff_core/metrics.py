"""Customization metrics: CLIP-T, CLIP-I and DINO-I (EqDiff §5.1, the Custom Diffusion protocol).

EqDiff reports its numbers "with the same setup and calculation procedures as Custom Diffusion"
(Kumari et al. 2023, ``customconcept101/evaluate.py``):

- **CLIP-T** (text alignment): for each generated image, the CLIP image embedding against the CLIP
  text embedding of its prompt *with the concept token removed* (``strip_concept_tokens``), scored
  as CLIPScore ``w * max(cos, 0)`` with ``w = 2.5`` (Hessel et al. 2021; that is why published
  CLIP-T values are near 0.8 while raw ViT-B/32 cosines are near 0.3), averaged over the images.
  ``w = 1`` gives the clipped cosine itself.
- **CLIP-I** / **DINO-I** (image alignment): the cosine between every generated image and every
  reference photo, averaged over all pairs, with CLIP ViT-B/32 image embeddings and the DINO
  ViT-S/16 CLS token (of the last layer, after its layer norm) respectively.

Image preprocessing (``ImageTransform``) is done in torch on the encoder's device, batched. It
reproduces a Hugging Face image processor (``CLIPImageProcessor``, ``ViTImageProcessor``,
``BitImageProcessor``): shortest-edge or exact resize with PIL's filter (antialiased bicubic or
bilinear; values clamped to [0, 1] as PIL's 8-bit output is), center crop (HF's ``(H - h) // 2``
offsets, zero padding when the image is smaller), rescale and normalize. Two sources of settings:
``custom_diffusion`` (the protocol's torchvision pipelines: CLIP resize 224 + crop 224 with CLIP's
mean/std; DINO resize 256 + crop 224 with ImageNet's mean/std; both bicubic) and ``model_folder``
(the folder's ``preprocessor_config.json``, as ``AutoImageProcessor`` reads it). The results differ
from the HF processor only by PIL's 8-bit rounding inside its resize.

Encoders come from local Hugging Face-format folders only (``local_files_only=True``; nothing is
downloaded): CLIP via ``transformers.CLIPModel`` (``get_image_features`` / ``get_text_features``),
DINO via ``ViTModel`` or ``Dinov2Model``. Images are (B, C, H, W) float tensors in [0, 1].
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

CLIP_SCORE_WEIGHT = 2.5
PREPROCESSING = ("custom_diffusion", "model_folder")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
MODEL_TYPES = {"clip": ("clip",), "dino": ("vit", "dinov2")}  # config.json model_type per kind
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL resampling codes (what HF processors store) -> torch interpolation modes; PIL's NEAREST
# samples pixel centres, which is torch's "nearest-exact".
_RESAMPLE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


class MetricModelError(ValueError):
    """A metric model folder that is missing, incomplete or of the wrong kind."""


# -- concept tokens --------------------------------------------------------------------------------
def strip_concept_tokens(prompt: str, tokens: Sequence[str]) -> str:
    """The prompt as CLIP-T reads it: every concept token removed.

    A token is removed where it stands as a word of its own (not inside a longer word, and not
    touching ``<`` or ``>``, the same boundary rule Apply Concept uses to find it). The spaces left
    behind collapse to one, a space left before ``, . ; : ! ?`` is dropped, and the ends are
    trimmed; nothing else changes, so the class word stays:
    ``"a <backpack_dog> backpack in the jungle"`` -> ``"a backpack in the jungle"``.
    """
    words = sorted({t for t in tokens if t}, key=len, reverse=True)
    text = prompt
    if words:
        pattern = "|".join(rf"(?<![\w<>]){re.escape(t)}(?![\w<>])" for t in words)
        text = re.sub(pattern, " ", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r" (?=[,.;:!?])", "", text)
    return text.strip()


def parse_tokens(text: str) -> list[str]:
    """Concept tokens from a comma- or whitespace-separated list (tokens never contain either)."""
    return [t for t in re.split(r"[\s,]+", text) if t]


# -- preprocessing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageTransform:
    """One HF image processor's pipeline. ``shortest_edge`` or ``resize_to`` (height, width) picks the
    resize (neither: no resize); ``crop`` is the center crop (height, width) or None; ``value_scale``
    maps [0, 1] to the range normalize sees (255 * HF's rescale_factor, or 255 without rescale)."""

    shortest_edge: int | None = None
    resize_to: tuple[int, int] | None = None
    resample: str = "bicubic"
    crop: tuple[int, int] | None = None
    value_scale: float = 1.0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @classmethod
    def from_hf_processor(cls, processor) -> "ImageTransform":
        """The settings of a loaded HF image processor (sizes already normalised by HF)."""
        shortest, resize_to = None, None
        if getattr(processor, "do_resize", False):
            size = dict(processor.size)
            if "shortest_edge" in size:
                shortest = int(size["shortest_edge"])
            elif {"height", "width"} <= size.keys():
                resize_to = (int(size["height"]), int(size["width"]))
            else:
                raise MetricModelError(f"preprocessor_config.json: size {size} is not supported; use "
                                       "preprocessing 'custom_diffusion' or a shortest_edge / height+width size")
        resample = int(getattr(processor, "resample", 3))
        if resample not in _RESAMPLE:
            raise MetricModelError(f"preprocessor_config.json: resample {resample} is not supported (only "
                                   "0 nearest, 2 bilinear, 3 bicubic); use preprocessing 'custom_diffusion'")
        crop = None
        if getattr(processor, "do_center_crop", False):
            crop = (int(processor.crop_size["height"]), int(processor.crop_size["width"]))
        # processors without the setting (LayoutLMv2) do not rescale: their pixel values stay 0-255
        scale = 255.0 * float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else 255.0
        mean = std = None
        if getattr(processor, "do_normalize", False):
            mean, std = tuple(map(float, processor.image_mean)), tuple(map(float, processor.image_std))
        return cls(shortest, resize_to, _RESAMPLE[resample], crop, scale, mean, std)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize, with HF's (and torchvision's) rounding."""
        if self.resize_to is not None:
            return self.resize_to
        if self.shortest_edge is None:
            return height, width
        if width <= height:
            return int(self.shortest_edge * height / width), self.shortest_edge
        return self.shortest_edge, int(self.shortest_edge * width / height)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, 3, h, w) normalised, float32, on the input's device."""
        x = to_rgb(images).float()
        size = self.output_size(*x.shape[-2:])
        if size != tuple(x.shape[-2:]):
            antialias = self.resample in ("bilinear", "bicubic")
            x = F.interpolate(x, size=size, mode=self.resample, antialias=antialias,
                              **({"align_corners": False} if antialias else {}))
            x = x.clamp(0.0, 1.0)  # PIL clips its 8-bit bicubic overshoot
        if self.crop is not None:
            x = center_crop(x, self.crop)
        x = x * self.value_scale
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x


CUSTOM_DIFFUSION_CLIP = ImageTransform(shortest_edge=224, crop=(224, 224), mean=CLIP_MEAN, std=CLIP_STD)
CUSTOM_DIFFUSION_DINO = ImageTransform(shortest_edge=256, crop=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)
CUSTOM_DIFFUSION = {"clip": CUSTOM_DIFFUSION_CLIP, "dino": CUSTOM_DIFFUSION_DINO}


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 3, H, W): gray is repeated, an alpha channel dropped (PIL's convert("RGB"))."""
    if images.dim() != 4 or images.shape[1] not in (1, 3, 4):
        raise ValueError(f"images must be (B, C, H, W) with 1, 3 or 4 channels; got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    return images[:, :3]


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """HF's center_crop: offsets ``(H - h) // 2``; an image smaller than the crop is zero padded first."""
    height, width = x.shape[-2:]
    crop_h, crop_w = size
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        top, left = math.ceil(pad_h / 2), math.ceil(pad_w / 2)
        x = F.pad(x, (left, pad_w - left, top, pad_h - top))
        height, width = x.shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return x[..., top:top + crop_h, left:left + crop_w]


# -- the metrics on embeddings ---------------------------------------------------------------------
def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def clip_t_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                  weight: float = CLIP_SCORE_WEIGHT) -> tuple[torch.Tensor, torch.Tensor]:
    """Per generated image: (CLIP-T score ``weight * max(cos, 0)``, the cosine); row i of the images
    goes with row i of the texts."""
    if image_embeds.shape[0] != text_embeds.shape[0]:
        raise ValueError(f"{image_embeds.shape[0]} images but {text_embeds.shape[0]} prompts")
    cos = (F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)).sum(-1)
    return weight * cos.clamp(min=0.0), cos


def image_alignment(generated_embeds: torch.Tensor, reference_embeds: torch.Tensor) -> torch.Tensor:
    """Per generated image, the mean cosine to every reference; their mean is the mean over all pairs."""
    return cosine_matrix(generated_embeds, reference_embeds).mean(dim=1)


# -- encoders ---------------------------------------------------------------------------------------
def _missing(folder: str, groups: Sequence[Sequence[str]]) -> bool:
    return not any(all(os.path.isfile(os.path.join(folder, f)) for f in group) for group in groups)


def check_model_folder(folder: str, kind: str, preprocessing: str = "custom_diffusion") -> None:
    """Raise MetricModelError naming the folder and the files it needs when it is not a usable
    ``kind`` ("clip" or "dino") model folder."""
    needs = ["config.json", " or ".join(WEIGHT_FILES[:2])]
    if kind == "clip":
        needs.append("tokenizer.json or vocab.json + merges.txt (with tokenizer_config.json)")
    if preprocessing == "model_folder":
        needs.append("preprocessor_config.json")
    expected = (f"a Hugging Face-format {'CLIP (e.g. openai/clip-vit-base-patch32)' if kind == 'clip' else 'DINO (e.g. facebook/dino-vits16)'}"
                f" model folder with {', '.join(needs)}")
    if not os.path.isdir(folder):
        raise MetricModelError(f"{kind} model folder '{folder}' does not exist; put {expected} there")
    missing = []
    if _missing(folder, [("config.json",)]):
        missing.append("config.json")
    else:
        model_type = _model_type(folder)
        if model_type not in MODEL_TYPES[kind]:
            raise MetricModelError(f"{kind} model folder '{folder}' holds a '{model_type}' model; it must be "
                                   f"{expected} (config.json model_type {' or '.join(MODEL_TYPES[kind])})")
    if _missing(folder, [(f,) for f in WEIGHT_FILES]):
        missing.append(" or ".join(WEIGHT_FILES[:2]))
    if kind == "clip" and _missing(folder, TOKENIZER_FILES):
        missing.append("tokenizer.json or vocab.json + merges.txt")
    if preprocessing == "model_folder" and _missing(folder, [("preprocessor_config.json",)]):
        missing.append("preprocessor_config.json")
    if missing:
        raise MetricModelError(f"{kind} model folder '{folder}' lacks {'; '.join(missing)}: it must be {expected}")


def _model_type(folder: str) -> str:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            return str(json.load(f).get("model_type", ""))
    except (OSError, ValueError, AttributeError) as err:
        raise MetricModelError(f"'{os.path.join(folder, 'config.json')}' is not a readable JSON object: {err}") from err


def image_transform(folder: str, kind: str, preprocessing: str) -> ImageTransform:
    """The preprocessing of a ``kind`` ("clip" or "dino") encoder: the Custom Diffusion protocol's, or
    the one the folder's preprocessor_config.json describes."""
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {', '.join(PREPROCESSING)}; got {preprocessing!r}")
    if preprocessing == "custom_diffusion":
        return CUSTOM_DIFFUSION[kind]
    if _missing(folder, [("preprocessor_config.json",)]):
        raise MetricModelError(f"{kind} model folder '{folder}' lacks preprocessor_config.json, which preprocessing "
                               "'model_folder' reads; add the model's file or use 'custom_diffusion'")
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, use_fast=False)
    except (OSError, ValueError) as err:
        raise MetricModelError(f"{kind} model folder '{folder}': preprocessor_config.json cannot be read: {err}") from err
    return ImageTransform.from_hf_processor(processor)


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


class ImageEncoder:
    """Shared batching: images go through ``transform`` and ``_embed`` in chunks on the model's device."""

    model: torch.nn.Module
    transform: ImageTransform

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor | Sequence[torch.Tensor], batch_size: int = 32,
                      on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """(B, C, H, W) in [0, 1], or a sequence of (C, H, W) images of any sizes (encoded in batches of
        equal size) -> (B, D) float32 embeddings (not normalised). ``on_batch(n)`` is called after each
        chunk of n images (progress, interruption)."""
        if torch.is_tensor(images):
            groups = {tuple(images.shape[-2:]): (list(range(images.shape[0])), images)}
        else:
            by_size: dict[tuple, list[int]] = {}
            for i, image in enumerate(images):
                by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
            groups = {size: (idx, torch.stack([images[i] for i in idx])) for size, idx in by_size.items()}
        out: list[torch.Tensor | None] = [None] * sum(len(idx) for idx, _ in groups.values())
        for indices, batch in groups.values():
            for part in _batches(batch.shape[0], batch_size):
                pixels = self.transform(batch[part].to(self.device, non_blocking=True))
                embeds = self._embed(pixels.to(self.dtype)).float()
                for i, row in zip(indices[part], embeds):
                    out[i] = row
                if on_batch is not None:
                    on_batch(part.stop - part.start)
        return torch.stack(out) if out else torch.empty(0, 0)


class ClipEncoder(ImageEncoder):
    """CLIP image and text embeddings (the projected features CLIP compares)."""

    def __init__(self, model, tokenizer, transform: ImageTransform):
        self.model, self.tokenizer, self.transform = model.eval(), tokenizer, transform

    @classmethod
    def load(cls, folder: str, preprocessing: str = "custom_diffusion",
             dtype: torch.dtype = torch.float32) -> "ClipEncoder":
        check_model_folder(folder, "clip", preprocessing)
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True).to(dtype)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as err:  # a broken folder raises whatever transformers, safetensors or tokenizers meet
            raise MetricModelError(f"clip model folder '{folder}' cannot be loaded: {err}") from err
        return cls(model, tokenizer, image_transform(folder, "clip", preprocessing))

    def _embed(self, pixels):
        return self.model.get_image_features(pixel_values=pixels)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Texts -> (N, D) float32 embeddings; longer texts are cut at CLIP's 77 tokens, as
        Custom Diffusion's ``clip.tokenize(truncate=True)`` does."""
        max_length = self.model.config.text_config.max_position_embeddings
        out = []
        for part in _batches(len(texts), batch_size):
            tokens = self.tokenizer(list(texts[part]), padding=True, truncation=True, max_length=max_length,
                                    return_tensors="pt").to(self.device)
            out.append(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                    attention_mask=tokens["attention_mask"]).float())
        return torch.cat(out)


class DinoEncoder(ImageEncoder):
    """DINO image embeddings: the CLS token of the last hidden state (after the final layer norm),
    what ``torch.hub`` dino_vits16 returns and Custom Diffusion compares."""

    def __init__(self, model, transform: ImageTransform):
        self.model, self.transform = model.eval(), transform

    @classmethod
    def load(cls, folder: str, preprocessing: str = "custom_diffusion",
             dtype: torch.dtype = torch.float32) -> "DinoEncoder":
        check_model_folder(folder, "dino", preprocessing)
        model_type = _model_type(folder)
        from transformers import Dinov2Model, ViTModel

        classes = {"vit": ViTModel, "dinov2": Dinov2Model}
        extra = {"add_pooling_layer": False} if model_type == "vit" else {}
        try:
            model = classes[model_type].from_pretrained(folder, local_files_only=True, **extra).to(dtype)
        except Exception as err:  # a broken folder raises whatever transformers, safetensors or tokenizers meet
            raise MetricModelError(f"dino model folder '{folder}' cannot be loaded: {err}") from err
        return cls(model, image_transform(folder, "dino", preprocessing))

    def _embed(self, pixels):
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


# -- evaluation --------------------------------------------------------------------------------------
@dataclass
class MetricsResult:
    """Per generated image and overall. ``clip_t`` is the CLIPScore (``clip_t_weight * max(cos, 0)``),
    ``clip_t_cosine`` the cosine it comes from."""

    prompts: list[str]
    clip_t: list[float]
    clip_t_cosine: list[float]
    clip_i: list[float]
    dino_i: list[float]
    reference_count: int
    clip_t_weight: float = CLIP_SCORE_WEIGHT
    info: dict = field(default_factory=dict)

    @staticmethod
    def _mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    def summary(self) -> dict:
        return {"clip_t": self._mean(self.clip_t), "clip_t_cosine": self._mean(self.clip_t_cosine),
                "clip_i": self._mean(self.clip_i), "dino_i": self._mean(self.dino_i)}

    def rows(self) -> list[dict]:
        """One row per generated image, then the mean row."""
        rows = [{"image": str(i), "prompt": p, "clip_t": t, "clip_t_cosine": c, "clip_i": ci, "dino_i": di}
                for i, (p, t, c, ci, di) in enumerate(zip(self.prompts, self.clip_t, self.clip_t_cosine,
                                                          self.clip_i, self.dino_i))]
        return rows + [{"image": "mean", "prompt": "", **self.summary()}]

    def to_csv(self) -> str:
        return rows_to_csv(self.rows())

    def to_json(self) -> str:
        return json.dumps({**self.summary(), "clip_t_weight": self.clip_t_weight, "generated": len(self.prompts),
                           "references": self.reference_count, "images": self.rows()[:-1], **self.info},
                          indent=1)


def rows_to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    return buffer.getvalue()


def evaluate(clip: ClipEncoder, dino: DinoEncoder, generated: torch.Tensor | Sequence[torch.Tensor],
             references: torch.Tensor | Sequence[torch.Tensor], prompts: Sequence[str],
             concept_tokens: Sequence[str] = (), clip_t_weight: float = CLIP_SCORE_WEIGHT, batch_size: int = 32,
             on_batch: Callable[[int], None] | None = None) -> MetricsResult:
    """CLIP-T, CLIP-I and DINO-I of N ``generated`` images against M ``references`` (each a (B, C, H, W)
    batch or a sequence of (C, H, W) images of any sizes), with one prompt per generated image (the
    concept tokens are stripped here). ``on_batch(n)`` is called after every chunk of n images or
    texts (3N + 2M units in all)."""
    if len(prompts) != len(generated):
        raise ValueError(f"{len(generated)} generated images but {len(prompts)} prompts")
    if len(generated) == 0 or len(references) == 0:
        raise ValueError("need at least one generated and one reference image")
    texts = [strip_concept_tokens(p, concept_tokens) for p in prompts]
    clip_generated = clip.encode_images(generated, batch_size, on_batch)
    clip_references = clip.encode_images(references, batch_size, on_batch)
    text_embeds = clip.encode_texts(texts)
    if on_batch is not None:
        on_batch(len(texts))
    score, cosine = clip_t_scores(clip_generated, text_embeds, clip_t_weight)
    clip_i = image_alignment(clip_generated, clip_references)
    dino_i = image_alignment(dino.encode_images(generated, batch_size, on_batch),
                             dino.encode_images(references, batch_size, on_batch))
    return MetricsResult(texts, score.tolist(), cosine.tolist(), clip_i.tolist(), dino_i.tolist(),
                         len(references), clip_t_weight)


# -- the table as an image -------------------------------------------------------------------------
def render_table(rows: list[dict], max_text: int = 48):
    """A PIL image of the rows (PIL's built-in default font; nothing is downloaded)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    header = list(rows[0])
    cells = [header] + [[(f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row.values()] for row in rows]
    cells = [[c if len(c) <= max_text else c[:max_text - 1] + "…" for c in line] for line in cells]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text):
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    pad = 6
    widths = [max(text_size(line[c])[0] for line in cells) + 2 * pad for c in range(len(header))]
    line_height = max(text_size(c)[1] for line in cells for c in line) + 2 * pad
    image = Image.new("RGB", (sum(widths) + 1, line_height * len(cells) + 1), "white")
    draw = ImageDraw.Draw(image)
    for r, line in enumerate(cells):
        y = r * line_height
        if r == 0 or r == len(cells) - 1:
            draw.rectangle([0, y, image.width - 1, y + line_height], fill=(230, 230, 230))
        x = 0
        for c, text in enumerate(line):
            draw.text((x + pad, y + pad), text, fill="black", font=font)
            draw.rectangle([x, y, x + widths[c], y + line_height], outline=(160, 160, 160))
            x += widths[c]
    return image
