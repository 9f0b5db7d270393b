"""Grounding Models Loader and Grounded Mask: subject masks from a text prompt (GroundingDINO + SAM)."""

from __future__ import annotations

import logging
import os

import torch

from ..eqdiff_core import grounding as core
from .comfyui import folders, management
from .comfyui.node_api import io, require_choices

log = logging.getLogger(__name__)
GROUNDING = io.Custom("EQDIFF_GROUNDING")
WEIGHT_EXTENSIONS = (".pth", ".safetensors")
DEVICES = ["auto", "cpu"]
PRECISIONS = ["auto", "float32"]

# (path, file mtime, device, dtype) -> (core model, its ModelPatcher)
_MODELS: dict[tuple, tuple] = {}


class GroundingModels:
    """What EQDIFF_GROUNDING carries: both models, their ModelPatchers and what was read from the files."""

    def __init__(self, dino, dino_patcher, sam, sam_patcher, names):
        self.dino, self.dino_patcher, self.sam, self.sam_patcher, self.names = dino, dino_patcher, sam, sam_patcher, names

    def load(self) -> None:
        """Puts both models on their device through ComfyUI's model management (which may offload others)."""
        management.load(self.dino_patcher, self.sam_patcher)

    def describe(self) -> str:
        return (f"GroundingDINO {self.dino.spec.variant} ({self.names[0]}), SAM {self.sam.spec.variant} "
                f"({self.names[1]})")


def weight_files(folder: str) -> list[str]:
    """Checkpoint files in a model folder, without the files of a BERT folder kept inside it."""
    return [n for n in folders.files(folder)
            if n.lower().endswith(WEIGHT_EXTENSIONS) and core.BERT_FOLDER not in n.replace("\\", "/").split("/")]


def bert_candidates() -> list[str]:
    """Where the BERT folder may be: models/grounding-dino/bert-base-uncased (each configured
    grounding-dino path), a bert-base-uncased folder of extra_model_paths.yaml, models/bert-base-uncased."""
    paths = [os.path.join(p, core.BERT_FOLDER) for p in folders.paths(folders.GROUNDING_DINO)]
    paths += folders.paths(core.BERT_FOLDER)
    paths.append(os.path.join(folders.models_dir(), core.BERT_FOLDER))
    return list(dict.fromkeys(paths))


def _weights_path(folder: str, name: str, input_name: str) -> str:
    path = folders.full_path(folder, name) if name else None
    if path is None or not os.path.isfile(path):
        where = ", ".join(folders.paths(folder))
        raise core.GroundingError(f"{input_name}: '{name}' is not in {where}. Put the original .pth or a "
                                  f".safetensors copy there, then refresh (R) and pick it.")
    return path


def _sam_dtype(load_device: torch.device, precision: str) -> torch.dtype:
    """SAM runs in half precision on CUDA (bf16 where supported); GroundingDINO always in float32,
    so that its scores meet the thresholds as in the reference implementation."""
    if precision == "float32" or load_device.type != "cuda":
        return torch.float32
    return management.half_dtype(load_device)


def _cached(path: str, device: str, dtype: torch.dtype, build):
    load_device, _ = management.devices(device)
    key = (path, os.path.getmtime(path), str(load_device), dtype)
    if key not in _MODELS:
        model = build(core.read_checkpoint(path), os.path.basename(path))
        model.model.to(dtype)
        _MODELS[key] = (model, management.managed(model.model, device))
    return _MODELS[key]


class EqDiffGroundingLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffGroundingLoader",
            display_name="Grounding Models Loader",
            category="EqDiff",
            description=(
                "Loads GroundingDINO (text -> boxes) and SAM (box -> mask) from the original checkpoints in "
                "models/grounding-dino and models/sams (the folders of the common Grounded-SAM packs; .pth or "
                ".safetensors). The architecture (Swin-T / Swin-B, ViT-H / L / B) is read from the weights. "
                "BERT's config.json and vocab.txt come from models/grounding-dino/bert-base-uncased; nothing "
                "is downloaded."
            ),
            inputs=[
                io.Combo.Input("grounding_dino", options=weight_files(folders.GROUNDING_DINO),
                               tooltip="GroundingDINO checkpoint in models/grounding-dino, e.g. "
                               "groundingdino_swint_ogc.pth (Swin-T) or groundingdino_swinb_cogcoor.pth (Swin-B)."),
                io.Combo.Input("sam", options=weight_files(folders.SAM),
                               tooltip="SAM checkpoint in models/sams, e.g. sam_vit_h_4b8939.pth, "
                               "sam_vit_l_0b3195.pth or sam_vit_b_01ec64.pth."),
                io.Combo.Input("device", options=DEVICES, default="auto",
                               tooltip="auto: ComfyUI's device, with the models offloaded when others need "
                               "the memory; cpu: always on the CPU."),
                io.Combo.Input("precision", options=PRECISIONS, default="auto",
                               tooltip="auto: SAM in bfloat16/float16 on CUDA, GroundingDINO in float32; "
                               "float32: both in float32."),
            ],
            outputs=[GROUNDING.Output("grounding", display_name="grounding",
                                      tooltip="Both models, for Grounded Mask.")],
        )

    @classmethod
    def validate_inputs(cls, grounding_dino, sam) -> bool | str:
        for name, value, folder in (("grounding_dino", grounding_dino, folders.GROUNDING_DINO),
                                    ("sam", sam, folders.SAM)):
            if value is not None and not weight_files(folder):
                where = ", ".join(folders.paths(folder))
                return f"{name}: no .pth or .safetensors file in {where}; put the original checkpoint there and refresh."
        return True

    @classmethod
    def execute(cls, grounding_dino, sam, device, precision) -> io.NodeOutput:
        require_choices(cls, device=device, precision=precision)
        dino_path = _weights_path(folders.GROUNDING_DINO, grounding_dino, "grounding_dino")
        sam_path = _weights_path(folders.SAM, sam, "sam")
        load_device, _ = management.devices(device)
        candidates = bert_candidates()
        dino, dino_patcher = _cached(dino_path, device, torch.float32,
                                     lambda state, name: core.build_dino(state, candidates, name))
        sam_model, sam_patcher = _cached(sam_path, device, _sam_dtype(load_device, precision), core.build_sam)
        models = GroundingModels(dino, dino_patcher, sam_model, sam_patcher, (grounding_dino, sam))
        log.info("EqDiff grounding: %s", models.describe())
        return io.NodeOutput(models)


class EqDiffGroundedMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffGroundedMask",
            display_name="Grounded Mask",
            category="EqDiff",
            description=(
                "Subject masks from a text prompt (Grounded-SAM), as EqDiff uses for MGDP and L_ra: for every "
                "image GroundingDINO finds boxes for the prompt's phrases, SAM makes a mask per box, and their "
                "union is the image's mask. An image where nothing is found gets an empty mask and a warning "
                "(report output and console); the batch is never cut or reordered."
            ),
            inputs=[
                GROUNDING.Input("grounding", tooltip="From Grounding Models Loader."),
                io.Image.Input("image", tooltip="The photos; every image of the batch gets its own mask."),
                io.String.Input("prompt", default="dog", tooltip="What to mask: one or more phrases separated by "
                                "'.' or ',', e.g. 'dog' or 'dog . red backpack'. Usually the subject's class word."),
                io.Float.Input("box_threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="A box is kept when its best score over the prompt's words reaches this. "
                               "Higher: fewer boxes (never a larger mask)."),
                io.Float.Input("text_threshold", default=0.25, min=0.0, max=1.0, step=0.01,
                               tooltip="The words whose score reaches this name a box's phrase; a box with none "
                               "is dropped. Higher: fewer boxes."),
                io.Combo.Input("boxes", options=["all", "best"], default="all",
                               tooltip="all: every box above the thresholds; best: only the highest-scoring one."),
                io.Int.Input("dilate", default=0, min=-256, max=256,
                             tooltip="Grow (positive) or shrink (negative) the mask by this many pixels."),
                io.Float.Input("feather", default=0.0, min=0.0, max=128.0, step=0.5,
                               tooltip="Soften the mask edge: Gaussian blur with this sigma in pixels (0: hard)."),
                io.Int.Input("detect_size", default=800, min=128, max=1333, step=1,
                             tooltip="GroundingDINO sees the image with this shorter side (800 as trained; "
                             "lower is faster, coarser)."),
            ],
            outputs=[
                io.Mask.Output("mask", display_name="mask", tooltip="(B, H, W) in [0, 1], one per input image."),
                io.Image.Output("overlay", display_name="overlay",
                                tooltip="Preview: the mask in red over each image, kept boxes in green; an image "
                                "with no detection gets a red frame."),
                io.String.Output("report", display_name="report",
                                 tooltip="One line per image: boxes found, their phrases and scores."),
            ],
        )

    @classmethod
    def validate_inputs(cls, prompt) -> bool | str:
        if prompt is not None and not core.parse_phrases(prompt):
            return "prompt: write what to mask, e.g. 'dog' or 'dog . red backpack' (phrases separated by '.' or ',')."
        return True

    @classmethod
    def execute(cls, grounding, image, prompt, box_threshold, text_threshold, boxes, dilate, feather,
                detect_size) -> io.NodeOutput:
        if not isinstance(grounding, GroundingModels):
            raise core.GroundingError("grounding: connect the output of Grounding Models Loader.")
        require_choices(cls, boxes=boxes)
        if image.ndim != 4 or image.shape[-1] < 3:
            raise core.GroundingError(f"image: expected an IMAGE batch (B, H, W, 3); got shape {tuple(image.shape)}.")
        phrases = core.parse_phrases(prompt)
        if not phrases:
            raise core.GroundingError("prompt: write what to mask, e.g. 'dog' or 'dog . red backpack'.")
        grounding.load()
        batch = image.shape[0]
        progress = management.Progress(batch)

        pixels = image[..., :3].movedim(-1, 1).float()  # (B, 3, H, W) on the intermediate device
        masks, detections = core.grounded_masks(grounding.dino, grounding.sam, pixels, prompt, box_threshold,
                                                text_threshold, best_only=boxes == "best", detect_size=detect_size,
                                                on_image=lambda _i: progress.update())
        mask = core.refine_mask(masks.float(), dilate, feather)
        preview = core.overlay(pixels, mask, detections)
        lines, empty = [], []
        for i, det in enumerate(detections):
            if det.boxes.shape[0] == 0:
                empty.append(i)
                preview[i, 0, :, :4] = preview[i, 0, :, -4:] = preview[i, 0, :4, :] = preview[i, 0, -4:, :] = 1.0
                preview[i, 1:, :, :4] = preview[i, 1:, :, -4:] = preview[i, 1:, :4, :] = preview[i, 1:, -4:, :] = 0.0
                lines.append(f"image {i}: nothing found for '{' . '.join(phrases)}' (empty mask)")
            else:
                found = ", ".join(f"{' / '.join(phrases[p] for p in ph) or '?'} {s:.2f}"
                                  for ph, s in zip(det.phrases, det.scores.tolist()))
                lines.append(f"image {i}: {det.boxes.shape[0]} box(es): {found}")
        if empty:
            log.warning("EqDiff Grounded Mask: nothing found for '%s' in image(s) %s of %d; their masks are empty. "
                        "Lower box_threshold / text_threshold or reword the prompt.", prompt, empty, batch)
        out_mask = mask.to(management.intermediate_device(), torch.float32).contiguous()
        return io.NodeOutput(out_mask, management.bchw_to_image(preview), "\n".join(lines))


NODES = [EqDiffGroundingLoader, EqDiffGroundedMask]
