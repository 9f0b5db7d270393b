"""Customization Metrics: CLIP-T, CLIP-I and DINO-I of generated images (EqDiff Table 1's protocol)."""

from __future__ import annotations

import copy
import os

import numpy as np
import torch

from ..eqdiff_core import metrics
from ..eqdiff_core.files import write_atomic
from .comfyui import folders, management
from .comfyui.node_api import io, require_choices, ui

DEFAULT_CLIP = "clip-vit-base-patch32"
DEFAULT_DINO = "dino-vits16"
DEVICES = ("auto", "cpu")

# (folder path, device, dtype) -> (encoder, its ModelPatcher); the patcher lets ComfyUI offload it
_ENCODERS: dict[tuple[str, str, torch.dtype], tuple] = {}


def model_folder_names(default: str) -> list[str]:
    """Sub-folders of the metric model folders (each a Hugging Face model folder), plus the default name
    so that a workflow naming it validates and then reports exactly what is missing."""
    names = {default}
    for root in folders.paths(folders.METRICS):
        if os.path.isdir(root):
            names |= {d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "config.json"))}
    return sorted(names)


def model_folder_path(name: str) -> str:
    """The first metric model folder holding ``name``; the default location when none does (loading
    then says what belongs there)."""
    for root in folders.paths(folders.METRICS):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return os.path.join(folders.models_dir(), folders.METRICS, name)


def load_encoder(kind: str, name: str, device: str, preprocessing: str) -> metrics.ImageEncoder:
    """A cached encoder, put on its device by ComfyUI's model management, with this run's preprocessing."""
    path = model_folder_path(name)
    load_device, _ = management.devices(device)
    key = (path, str(load_device), torch.float32)
    transform = metrics.image_transform(path, kind, preprocessing)
    if key not in _ENCODERS:
        loader = metrics.ClipEncoder if kind == "clip" else metrics.DinoEncoder
        encoder = loader.load(path, preprocessing, torch.float32)
        _ENCODERS[key] = (encoder, management.managed(encoder.model, device))
    encoder, patcher = _ENCODERS[key]
    management.load(patcher)
    run = copy.copy(encoder)  # the cached weights with this run's image transform
    run.transform = transform
    return run


def split_prompts(text: str, count: int) -> list[str]:
    """One prompt per generated image: one line each, or a single line for all (blank lines skipped)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"prompts: {len(lines)} lines for {count} generated images; write one prompt per "
                         "generated image (one line each, in batch order) or a single line for all of them")
    return lines


class EqDiffMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffMetrics",
            display_name="Customization Metrics",
            category="EqDiff",
            description=(
                "CLIP-T, CLIP-I and DINO-I of generated images against the subject's reference photos, as in "
                "EqDiff's Table 1 (the Custom Diffusion protocol): CLIP-T = w * max(cos, 0) between each image "
                "and its prompt with the concept token removed (w = 2.5, CLIPScore); CLIP-I / DINO-I = mean cosine "
                "over all generated x reference pairs (CLIP ViT-B/32 image features; DINO ViT-S/16 CLS token). "
                "Models are local Hugging Face folders in models/eqdiff_metrics/ (never downloaded)."
            ),
            inputs=[
                io.Image.Input("generated", tooltip="The generated images (a batch)."),
                io.Image.Input("references", tooltip="The subject's reference photos (a batch; photos of "
                               "different sizes must be brought to one size first, e.g. with Upscale Image)."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="The prompt of each generated image, one line per image in batch order, "
                                "or a single line used for all. Written as given to the sampler, concept token "
                                "included; it is removed below before CLIP reads the text."),
                io.String.Input("concept_tokens", default="<backpack_dog>",
                                tooltip="The concept token(s) to remove from the prompts for CLIP-T (comma or "
                                "space separated); link Apply Concept's token output here. Empty: remove nothing."),
                io.Combo.Input("clip_model", options=model_folder_names(DEFAULT_CLIP), default=DEFAULT_CLIP,
                               tooltip="A CLIP model folder in models/eqdiff_metrics/ (Hugging Face format, e.g. "
                               "openai/clip-vit-base-patch32: config.json, model.safetensors or "
                               "pytorch_model.bin, tokenizer files)."),
                io.Combo.Input("dino_model", options=model_folder_names(DEFAULT_DINO), default=DEFAULT_DINO,
                               tooltip="A DINO model folder in models/eqdiff_metrics/ (Hugging Face format, e.g. "
                               "facebook/dino-vits16, or a DINOv2: config.json, model.safetensors or "
                               "pytorch_model.bin)."),
                io.Combo.Input("preprocessing", options=list(metrics.PREPROCESSING), default="custom_diffusion",
                               tooltip="custom_diffusion: the protocol's resize + center crop (CLIP 224/224, DINO "
                               "256/224, bicubic), comparable with published numbers. model_folder: what each "
                               "folder's preprocessor_config.json says (the Hugging Face image processor)."),
                io.Float.Input("clip_t_weight", default=metrics.CLIP_SCORE_WEIGHT, min=0.01, max=100.0, step=0.01,
                               tooltip="w in CLIP-T = w * max(cos, 0). 2.5 is CLIPScore, the scale of Custom "
                               "Diffusion's and EqDiff's tables; 1 gives the (clipped) cosine."),
                io.Combo.Input("device", options=list(DEVICES), default="auto",
                               tooltip="auto: ComfyUI's device (the GPU when there is one); cpu: always the CPU."),
                io.String.Input("filename_prefix", default="eqdiff/metrics",
                                tooltip="Also write <prefix>_NNNNN_.csv and .json into the output folder; empty "
                                "writes nothing."),
            ],
            outputs=[
                io.String.Output("csv", display_name="csv", tooltip="One row per generated image, then the mean."),
                io.String.Output("json", display_name="json", tooltip="The means, the settings and every image's "
                                 "scores as JSON."),
                io.Float.Output("clip_t", display_name="CLIP-T", tooltip="Mean CLIP-T (text alignment)."),
                io.Float.Output("clip_i", display_name="CLIP-I", tooltip="Mean CLIP-I (image alignment)."),
                io.Float.Output("dino_i", display_name="DINO-I", tooltip="Mean DINO-I (image alignment)."),
                io.Image.Output("table", display_name="table", tooltip="The table as an image."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, generated, references, prompts, concept_tokens, clip_model, dino_model, preprocessing,
                clip_t_weight, device, filename_prefix) -> io.NodeOutput:
        require_choices(cls, clip_model=clip_model, dino_model=dino_model, preprocessing=preprocessing, device=device)
        prompt_list = split_prompts(prompts, generated.shape[0])
        clip = load_encoder("clip", clip_model, device, preprocessing)
        dino = load_encoder("dino", dino_model, device, preprocessing)
        progress = management.Progress(3 * generated.shape[0] + 2 * references.shape[0])
        result = metrics.evaluate(clip, dino, generated.movedim(-1, 1), references.movedim(-1, 1), prompt_list,
                                  metrics.parse_tokens(concept_tokens), clip_t_weight, on_batch=progress.update)
        result.info = {"clip_model": clip_model, "dino_model": dino_model, "preprocessing": preprocessing,
                       "concept_tokens": metrics.parse_tokens(concept_tokens)}
        csv_text, json_text = result.to_csv(), result.to_json()
        if filename_prefix.strip():
            folder, stem = folders.output_file_stem(filename_prefix.strip())
            write_atomic(os.path.join(folder, f"{stem}.csv"), csv_text)
            write_atomic(os.path.join(folder, f"{stem}.json"), json_text)
        table = torch.from_numpy(np.asarray(metrics.render_table(result.rows()), dtype=np.float32) / 255.0)[None]
        summary = result.summary()
        return io.NodeOutput(csv_text, json_text, summary["clip_t"], summary["clip_i"], summary["dino_i"], table,
                             ui=ui.PreviewImage(table, cls=cls))


NODES = [EqDiffMetrics]
