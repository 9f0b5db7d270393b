"""Subject masks from a text prompt: GroundingDINO boxes, a SAM mask per box, their union.

EqDiff needs a subject mask M for every training photo (MGDP, Eq. 6-7, and L_ra, Eq. 10); the paper
makes them with Grounded-SAM. The networks are Hugging Face transformers' own implementations,
``GroundingDinoForObjectDetection`` and ``SamModel``, which exist unchanged in transformers 4.5x and
5.x. What people have on disk are the ORIGINAL repositories' checkpoints (IDEA-Research's
``groundingdino_swint_ogc.pth`` / ``groundingdino_swinb_cogcoor.pth``, Meta's ``sam_vit_{h,l,b}_*.pth``)
or ``.safetensors`` copies of them; this module reads those, finds the architecture from the tensor
shapes (never from the file name), renames the keys to transformers' names and loads them strictly.

Safety: ``.safetensors`` through safetensors, ``.pth`` through ``torch.load(weights_only=True)``;
no config is downloaded or executed and nothing reaches the network. GroundingDINO's text encoder is
BERT: its architecture and vocabulary come from a local folder (``config.json`` + ``vocab.txt`` or
``tokenizer.json``); its weights come from the GroundingDINO checkpoint, which holds them, or from
``model.safetensors`` in that folder.

Layouts: images are (B, 3, H, W) float in [0, 1]; masks (B, H, W) float in [0, 1]; boxes are
(N, 4) ``x0, y0, x1, y1`` in pixels of the image they belong to.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

BERT_FOLDER = "bert-base-uncased"
BERT_FILES = "config.json and vocab.txt (or tokenizer.json), plus model.safetensors when the GroundingDINO file holds no bert.* weights"
# bert-base-uncased's ids of [CLS], [SEP], '.', '?': both GroundingDINO implementations rely on them
SPECIAL_TOKEN_IDS = {"[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAM_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)
KNOWN_SWIN = {(96, (2, 2, 6, 2)): "Swin-T", (128, (2, 2, 18, 2)): "Swin-B"}
KNOWN_SAM = {(1280, 32): "ViT-H", (1024, 24): "ViT-L", (768, 12): "ViT-B"}


class GroundingError(ValueError):
    """A checkpoint, folder or input that cannot be used; the message says what to do."""


# -- reading files -------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``.pth`` file, unwrapped from ``{"model": ...}`` and with
    a ``module.`` prefix removed. Raises GroundingError for a missing, corrupt or non-tensor file."""
    path = Path(path)
    if not path.is_file():
        raise GroundingError(f"{path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):  # a harmless container some files hold
                state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError, Exception) as e:  # noqa: B014
        with open(path, "rb") as f:  # a damaged checkpoint can be gigabytes: read only its head
            head = f.read(16)
        hint = " It looks like an HTML page, not weights: download the file again." if b"<" in head else ""
        raise GroundingError(
            f"{path.name} cannot be read as weights ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"The file is damaged, incomplete or not a checkpoint.{hint} Replace it with the original "
            f".pth (loaded with torch.load(weights_only=True)) or a .safetensors copy."
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise GroundingError(f"{path.name} holds no state dict of tensors; it is not a GroundingDINO or SAM checkpoint.")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


# -- architectures from tensor shapes ------------------------------------------------------------
def _count(state, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in state for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


@dataclass
class DinoSpec:
    """GroundingDINO architecture read from a checkpoint."""

    variant: str                 # "Swin-T", "Swin-B" or "Swin (embed N)"
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    num_queries: int
    num_feature_levels: int
    text_hidden: int
    text_layers: int
    text_vocab: int
    has_bert: bool

    def config(self, text_config: dict) -> "transformers.GroundingDinoConfig":  # noqa: F821
        from transformers import GroundingDinoConfig, SwinConfig

        backbone = SwinConfig(embed_dim=self.embed_dim, depths=list(self.depths), num_heads=list(self.num_heads),
                              window_size=self.window_size, image_size=224 if self.window_size == 7 else 384,
                              out_indices=[2, 3, 4])
        return GroundingDinoConfig(
            backbone_config=backbone, text_config=text_config, d_model=self.d_model,
            encoder_layers=self.encoder_layers, decoder_layers=self.decoder_layers,
            encoder_ffn_dim=self.encoder_ffn_dim, decoder_ffn_dim=self.decoder_ffn_dim,
            num_queries=self.num_queries, num_feature_levels=self.num_feature_levels,
        )


def dino_spec(state: dict[str, torch.Tensor], name: str = "the file") -> DinoSpec:
    """Reads the GroundingDINO architecture from the shapes of an original-format state dict."""
    if "backbone.0.patch_embed.proj.weight" not in state or "transformer.level_embed" not in state:
        other = " It looks like a SAM checkpoint: put it in models/sams." if any(k.startswith("image_encoder.") for k in state) else ""
        raise GroundingError(f"{name} is not an original GroundingDINO checkpoint (no backbone.0.patch_embed / "
                             f"transformer.level_embed weights).{other}")
    embed = state["backbone.0.patch_embed.proj.weight"].shape[0]
    stages = _count(state, r"backbone\.0\.layers\.(\d+)\.")
    depths = tuple(_count(state, rf"backbone\.0\.layers\.{i}\.blocks\.(\d+)\.") for i in range(stages))
    tables = [state[f"backbone.0.layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(stages)]
    window = (math.isqrt(tables[0].shape[0]) + 1) // 2
    d_model = state["transformer.level_embed"].shape[1]
    bert = "bert.embeddings.word_embeddings.weight"
    text_hidden = state["feat_map.weight"].shape[1]
    return DinoSpec(
        variant=KNOWN_SWIN.get((embed, depths), f"Swin (embed {embed}, depths {list(depths)})"),
        embed_dim=embed, depths=depths, num_heads=tuple(t.shape[1] for t in tables), window_size=window,
        d_model=d_model,
        encoder_layers=_count(state, r"transformer\.encoder\.layers\.(\d+)\."),
        decoder_layers=_count(state, r"transformer\.decoder\.layers\.(\d+)\."),
        encoder_ffn_dim=state["transformer.encoder.layers.0.linear1.weight"].shape[0],
        decoder_ffn_dim=state["transformer.decoder.layers.0.linear1.weight"].shape[0],
        num_queries=state["transformer.tgt_embed.weight"].shape[0],
        num_feature_levels=state["transformer.level_embed"].shape[0],
        text_hidden=text_hidden,
        text_layers=_count(state, r"bert\.encoder\.layer\.(\d+)\."),
        text_vocab=state[bert].shape[0] if bert in state else 0,
        has_bert=bert in state,
    )


@dataclass
class SamSpec:
    """SAM architecture read from a checkpoint."""

    variant: str                 # "ViT-H", "ViT-L", "ViT-B" or "ViT (dim N)"
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    window_size: int
    global_attn_indexes: list[int]
    image_size: int
    patch_size: int
    output_channels: int

    def config(self) -> "transformers.SamConfig":  # noqa: F821
        from transformers import SamConfig, SamVisionConfig

        vision = SamVisionConfig(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                                 num_attention_heads=self.num_heads, mlp_dim=self.mlp_dim,
                                 window_size=self.window_size, global_attn_indexes=self.global_attn_indexes,
                                 image_size=self.image_size, patch_size=self.patch_size,
                                 output_channels=self.output_channels)
        return SamConfig(vision_config=vision.to_dict())


def sam_spec(state: dict[str, torch.Tensor], name: str = "the file") -> SamSpec:
    """Reads the SAM image-encoder architecture from the shapes of an original-format state dict."""
    if "image_encoder.patch_embed.proj.weight" not in state or "mask_decoder.iou_token.weight" not in state:
        other = " It looks like a GroundingDINO checkpoint: put it in models/grounding-dino." if "transformer.level_embed" in state else ""
        raise GroundingError(f"{name} is not an original SAM checkpoint (no image_encoder.patch_embed / "
                             f"mask_decoder weights).{other} HQ-SAM and MobileSAM files are not supported.")
    proj = state["image_encoder.patch_embed.proj.weight"]
    hidden, patch = proj.shape[0], proj.shape[-1]
    layers = _count(state, r"image_encoder\.blocks\.(\d+)\.")
    rel = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape for i in range(layers)]
    grid = state["image_encoder.pos_embed"].shape[1]
    global_idx = [i for i, s in enumerate(rel) if s[0] == 2 * grid - 1]
    windowed = [s[0] for s in rel if s[0] != 2 * grid - 1]
    return SamSpec(
        variant=KNOWN_SAM.get((hidden, layers), f"ViT (dim {hidden}, {layers} blocks)"),
        hidden_size=hidden, num_layers=layers, num_heads=hidden // rel[0][1],
        mlp_dim=state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0],
        window_size=(windowed[0] + 1) // 2 if windowed else 14, global_attn_indexes=global_idx,
        image_size=grid * patch, patch_size=patch, output_channels=state["image_encoder.neck.0.weight"].shape[0],
    )


# -- original key names -> transformers key names ------------------------------------------------
_SWIN_BLOCK = [("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
               ("attn.relative_position_bias_table", "attention.self.relative_position_bias_table"),
               ("attn.relative_position_index", "attention.self.relative_position_index"),
               ("attn.proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]
_DEFORMABLE = [("self_attn.", "deformable_layer.self_attn."), ("norm1", "deformable_layer.self_attn_layer_norm"),
               ("linear1", "deformable_layer.fc1"), ("linear2", "deformable_layer.fc2"),
               ("norm2", "deformable_layer.final_layer_norm")]
_TEXT_ENHANCER = [("self_attn.", "text_enhancer_layer.self_attn."), ("linear1", "text_enhancer_layer.fc1"),
                  ("linear2", "text_enhancer_layer.fc2"), ("norm1", "text_enhancer_layer.layer_norm_before"),
                  ("norm2", "text_enhancer_layer.layer_norm_after")]
_FUSION = [("gamma_v", "fusion_layer.vision_param"), ("gamma_l", "fusion_layer.text_param"),
           ("layer_norm_v", "fusion_layer.layer_norm_vision"), ("layer_norm_l", "fusion_layer.layer_norm_text"),
           ("attn.values_v_proj", "fusion_layer.attn.values_vision_proj"),
           ("attn.values_l_proj", "fusion_layer.attn.values_text_proj"),
           ("attn.out_v_proj", "fusion_layer.attn.out_vision_proj"),
           ("attn.out_l_proj", "fusion_layer.attn.out_text_proj"),
           ("attn.v_proj", "fusion_layer.attn.vision_proj"), ("attn.l_proj", "fusion_layer.attn.text_proj")]
_DECODER = [("cross_attn.", "encoder_attn."), ("norm1", "encoder_attn_layer_norm"), ("ca_text.", "encoder_attn_text."),
            ("catext_norm", "encoder_attn_text_layer_norm"), ("self_attn.", "self_attn."),
            ("norm2", "self_attn_layer_norm"), ("linear1", "fc1"), ("linear2", "fc2"), ("norm3", "final_layer_norm")]


def _swap(rest: str, table) -> str | None:
    for old, new in table:
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def convert_dino_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original GroundingDINO keys -> ``GroundingDinoForObjectDetection`` keys (the mapping of
    transformers' conversion script, including the split of Swin's fused qkv)."""
    out: dict[str, torch.Tensor] = {}
    swin = "model.backbone.conv_encoder.model."
    for key, value in state.items():
        new = None
        if m := re.match(r"backbone\.0\.patch_embed\.(proj|norm)\.(.*)", key):
            new = swin + ("embeddings.patch_embeddings.projection." if m[1] == "proj" else "embeddings.norm.") + m[2]
        elif m := re.match(r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.(.*)", key):
            prefix = f"{swin}encoder.layers.{m[1]}.blocks.{m[2]}."
            if m[3].startswith("attn.qkv."):
                for i, part in enumerate(("query", "key", "value")):
                    out[f"{prefix}attention.self.{part}.{m[3][9:]}"] = value.chunk(3, dim=0)[i]
                continue
            rest = _swap(m[3], _SWIN_BLOCK)
            new = prefix + rest if rest else None
        elif m := re.match(r"backbone\.0\.layers\.(\d+)\.downsample\.(.*)", key):
            new = f"{swin}encoder.layers.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"backbone\.0\.norm(\d+)\.(.*)", key):
            new = f"{swin}hidden_states_norms.stage{int(m[1]) + 1}.{m[2]}"
        elif key.startswith("bert.pooler."):
            continue  # transformers builds the text backbone without the pooler
        elif key.startswith("bert."):
            new = "model.text_backbone." + key[5:]
        elif key.startswith("input_proj."):
            new = "model.input_proj_vision." + key[11:]
        elif key.startswith("feat_map."):
            new = "model.text_projection." + key[9:]
        elif m := re.match(r"transformer\.encoder\.(layers|text_layers|fusion_layers)\.(\d+)\.(.*)", key):
            table = {"layers": _DEFORMABLE, "text_layers": _TEXT_ENHANCER, "fusion_layers": _FUSION}[m[1]]
            rest = _swap(m[3], table)
            new = f"model.encoder.layers.{m[2]}.{rest}" if rest else None
        elif m := re.match(r"transformer\.decoder\.layers\.(\d+)\.(.*)", key):
            rest = _swap(m[2], _DECODER)
            new = f"model.decoder.layers.{m[1]}.{rest}" if rest else None
        elif key.startswith("transformer.decoder.ref_point_head."):
            new = "model.decoder.reference_points_head." + key[len("transformer.decoder.ref_point_head."):]
        elif key.startswith("transformer.decoder.norm."):
            new = "model.decoder.layer_norm." + key[len("transformer.decoder.norm."):]
        elif key.startswith("transformer.enc_output"):
            new = "model." + key[len("transformer."):]
        elif key.startswith("transformer.enc_out_bbox_embed."):
            new = "model.encoder_output_bbox_embed." + key[len("transformer.enc_out_bbox_embed."):]
        elif key == "transformer.level_embed":
            new = "model.level_embed"
        elif key == "transformer.tgt_embed.weight":
            new = "model.query_position_embeddings.weight"
        elif m := re.match(r"bbox_embed\.(\d+)\.(.*)", key):
            out[f"bbox_embed.{m[1]}.{m[2]}"] = value
            new = f"model.decoder.bbox_embed.{m[1]}.{m[2]}"
        elif key.startswith("transformer.decoder.bbox_embed."):
            continue  # the same head as bbox_embed.*
        if new is None:
            continue
        if new.endswith(".in_proj_weight") or new.endswith(".in_proj_bias"):  # torch MHA -> separate q, k, v
            base, kind = new.rsplit(".in_proj_", 1)
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{base}.{part}.{kind}"] = chunk
            continue
        out[new] = value
    return out


# transformers 5 renamed the Swin backbone's modules; applied only to names the model does not know
_TF5_RENAMES = [
    ("conv_encoder.model.embeddings.", "conv_encoder.model.swin.embeddings."),
    ("conv_encoder.model.encoder.", "conv_encoder.model.swin.encoder."),
    ("attention.self.relative_position_bias_table", "attention.relative_position_bias.relative_position_bias_table"),
    ("attention.self.query.", "attention.q_proj."), ("attention.self.key.", "attention.k_proj."),
    ("attention.self.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."),
    ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."),
]


def fit_names(state: dict[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    """Renames keys that the installed transformers names differently (4.x names -> 5.x names)."""
    out = {}
    for key, value in state.items():
        if key not in expected:
            alt = key
            for old, new in _TF5_RENAMES:
                alt = alt.replace(old, new)
            key = alt if alt in expected else key
        out[key] = value
    return out


_SAM_RENAMES = [
    ("iou_prediction_head.layers.0", "iou_prediction_head.proj_in"),
    ("iou_prediction_head.layers.1", "iou_prediction_head.layers.0"),
    ("iou_prediction_head.layers.2", "iou_prediction_head.proj_out"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    ("mask_downscaling.0", "mask_embed.conv1"), ("mask_downscaling.1", "mask_embed.layer_norm1"),
    ("mask_downscaling.3", "mask_embed.conv2"), ("mask_downscaling.4", "mask_embed.layer_norm2"),
    ("mask_downscaling.6", "mask_embed.conv3"), ("point_embeddings", "point_embed"),
    ("pe_layer.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    ("image_encoder", "vision_encoder"), ("neck.0", "neck.conv1"), ("neck.1", "neck.layer_norm1"),
    ("neck.2", "neck.conv2"), ("neck.3", "neck.layer_norm2"), ("patch_embed.proj", "patch_embed.projection"),
    (".norm", ".layer_norm"), ("blocks", "layers"),
]


def convert_sam_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original SAM keys -> ``SamModel`` keys (the mapping of transformers' conversion script)."""
    out = {}
    for key, value in state.items():
        if key in ("pixel_mean", "pixel_std"):
            continue
        for old, new in _SAM_RENAMES:
            key = key.replace(old, new)
        if m := re.match(r"(.*output_hypernetworks_mlps\.\d+\.)layers\.(\d)(.*)", key):
            key = m[1] + {"0": "proj_in", "1": "layers.0", "2": "proj_out"}[m[2]] + m[3]
        out[key] = value
    out["shared_image_embedding.positional_embedding"] = out["prompt_encoder.shared_embedding.positional_embedding"]
    return out


# -- building the models -------------------------------------------------------------------------
@contextlib.contextmanager
def _no_init():
    """Skip transformers' random initialisation: every tensor is overwritten by the checkpoint."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5.x
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4.x
    with no_init_weights():
        yield


def _load_strict(model: torch.nn.Module, state: dict, name: str, kind: str) -> None:
    expected = model.state_dict()
    state = fit_names(state, expected)
    # buffers computed at construction, and Swin's final norm that the backbone never uses
    ignorable = re.compile(r".*(relative_position_index|position_ids|token_type_ids|special_tokens)$|.*swin\.layernorm\.")
    missing = [k for k in expected if k not in state and not ignorable.match(k)]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or wrong:
        detail = "; ".join(wrong[:3] or [f"missing {', '.join(missing[:5])}"])
        raise GroundingError(f"{name} does not fit the {kind} architecture read from it: {detail}. The file may be "
                             f"truncated or a variant this pack does not support.")
    # computed buffers (index tables, position ids) stay as the model built them
    model.load_state_dict({k: v for k, v in state.items() if k in expected and not ignorable.match(k)}, strict=False)


def find_bert_folder(candidates: list[str | os.PathLike]) -> Path | None:
    """The first folder (searched to depth 4 below each candidate, e.g. a hub-cache layout) that has
    config.json and vocab.txt or tokenizer.json."""
    for root in candidates:
        root = Path(root)
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            if len(Path(dirpath).relative_to(root).parts) > 4:
                dirnames.clear()
                continue
            dirnames.sort()
            if "config.json" in filenames and ({"vocab.txt", "tokenizer.json"} & set(filenames)):
                return Path(dirpath)
    return None


def load_bert_parts(folder: Path, spec: DinoSpec):
    """(text config dict, tokenizer, bert weights or None) from a local BERT folder, checked against
    the checkpoint; local files only."""
    from transformers import BertTokenizerFast

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise GroundingError(f"{folder / 'config.json'} cannot be read ({e}); it must be bert-base-uncased's config.json.") from None
    if config.get("model_type", "bert") != "bert":
        raise GroundingError(f"{folder / 'config.json'} describes a {config.get('model_type')} model; GroundingDINO needs "
                             f"bert-base-uncased's config.json.")
    for key in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        config.pop(key, None)
    try:  # from the folder's files only (vocab.txt alone is enough); the constructor differs in 5.x
        tokenizer = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is the folder's
        raise GroundingError(f"The tokenizer in {folder} cannot be loaded ({type(e).__name__}: {e}); it needs "
                             f"bert-base-uncased's vocab.txt or tokenizer.json.") from None
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKEN_IDS}
    if ids != SPECIAL_TOKEN_IDS:
        raise GroundingError(f"The vocabulary in {folder} is not bert-base-uncased's (token ids {ids}, expected "
                             f"{SPECIAL_TOKEN_IDS}); GroundingDINO was trained with that vocabulary.")
    if config.get("hidden_size", 768) != spec.text_hidden:
        raise GroundingError(f"{folder / 'config.json'} has hidden_size {config.get('hidden_size', 768)} but the "
                             f"GroundingDINO file's text encoder has {spec.text_hidden}; use the BERT it was trained with "
                             f"(bert-base-uncased).")
    weights = None
    if not spec.has_bert:
        st = folder / "model.safetensors"
        if not st.is_file():
            raise GroundingError(f"The GroundingDINO file holds no BERT weights and {folder} has no model.safetensors; "
                                 f"put bert-base-uncased's model.safetensors there.")
        weights = {("bert." + k[5:] if k.startswith("bert.") else "bert." + k): v for k, v in read_checkpoint(st).items()}
    return config, tokenizer, weights


@dataclass
class GroundingDino:
    """A loaded GroundingDINO: the transformers model, its tokenizer and its architecture."""

    model: torch.nn.Module
    tokenizer: object
    spec: DinoSpec


@dataclass
class Sam:
    model: torch.nn.Module
    spec: SamSpec


def build_dino(state: dict[str, torch.Tensor], bert_candidates: list, name: str = "the file") -> GroundingDino:
    """A ``GroundingDinoForObjectDetection`` (CPU, float32, eval) with the checkpoint's weights."""
    from transformers import GroundingDinoForObjectDetection

    spec = dino_spec(state, name)
    folder = find_bert_folder(bert_candidates)
    if folder is None:
        where = ", ".join(str(Path(c)) for c in bert_candidates)
        raise GroundingError(f"GroundingDINO needs the BERT text encoder's files from a local folder (nothing is "
                             f"downloaded). Put {BERT_FILES} of bert-base-uncased into a folder "
                             f"'{BERT_FOLDER}' inside one of: {where}.")
    text_config, tokenizer, bert_weights = load_bert_parts(folder, spec)
    if bert_weights is not None:
        state = {**state, **bert_weights}
    config = spec.config(text_config)
    with _no_init():
        model = GroundingDinoForObjectDetection(config)
    _load_strict(model, convert_dino_state(state), name, f"GroundingDINO {spec.variant}")
    return GroundingDino(model.eval().requires_grad_(False), tokenizer, spec)


def build_sam(state: dict[str, torch.Tensor], name: str = "the file") -> Sam:
    """A ``SamModel`` (CPU, float32, eval) with the checkpoint's weights."""
    from transformers import SamModel

    spec = sam_spec(state, name)
    with _no_init():
        model = SamModel(spec.config())
    _load_strict(model, convert_sam_state(state), name, f"SAM {spec.variant}")
    return Sam(model.eval().requires_grad_(False), spec)


# -- text ----------------------------------------------------------------------------------------
def parse_phrases(prompt: str) -> list[str]:
    """Phrases of a prompt separated by '.' or ',' (lower-cased, empty ones dropped)."""
    return [p.strip().lower() for p in re.split(r"[.,]", prompt) if p.strip()]


def tokenize_phrases(tokenizer, phrases: list[str], max_len: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """GroundingDINO's caption "a . b ." as input ids (1, T) and, per token, the index of its phrase
    (-1 for [CLS], [SEP] and the separators)."""
    if not phrases:
        raise GroundingError("The prompt names nothing to find: write one or more phrases separated by '.' or ',', "
                             "e.g. 'dog . red backpack'.")
    ids = tokenizer(" . ".join(phrases) + " .")["input_ids"][:max_len]
    owner, phrase = [], 0
    for i in ids:
        if i in (SPECIAL_TOKEN_IDS["[CLS]"], SPECIAL_TOKEN_IDS["[SEP]"]):
            owner.append(-1)
        elif i == SPECIAL_TOKEN_IDS["."]:
            owner.append(-1)
            phrase += 1
        else:
            owner.append(phrase)
    return torch.tensor([ids]), torch.tensor(owner)


# -- detection -----------------------------------------------------------------------------------
def detect_shape(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    """GroundingDINO's resize rule (its datasets/transforms.py, ``get_size_with_aspect_ratio``):
    the shorter side becomes ``size``, lowered so that the longer side stays near ``max_size``, and
    the longer side is truncated, not rounded. Returns (h, w)."""
    short, long = min(height, width), max(height, width)
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def dino_inputs(image: torch.Tensor, size: int, max_size: int = 1333) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> GroundingDINO's input: resized by ``detect_shape``, ImageNet-normalised."""
    x = F.interpolate(image.float(), size=detect_shape(*image.shape[-2:], size, max_size), mode="bilinear",
                      align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def fit_detect_size(size: int, height: int, width: int, num_queries: int, max_size: int = 1333) -> int:
    """The smallest shorter side >= ``size`` (in steps of 32) at which the image yields at least
    ``num_queries`` feature tokens (strides 8, 16, 32, 64): GroundingDINO picks its queries among
    them. Growth stops where the longer side reaches ``max_size``."""
    while True:
        h, w = detect_shape(height, width, size, max_size)
        tokens = sum(math.ceil(h / s) * math.ceil(w / s) for s in (8, 16, 32, 64))
        if tokens >= num_queries or max(height, width) / min(height, width) * size > max_size:
            return size
        size += 32


@torch.no_grad()
def dino_forward(dino: GroundingDino, pixels: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token probabilities (B, Q, T) and boxes (B, Q, 4) ``cx, cy, w, h`` in [0, 1] for normalised
    pixels (B, 3, h, w) and one caption's ids (1, T)."""
    model = dino.model
    p = next(model.parameters())
    b, t = pixels.shape[0], input_ids.shape[1]
    ids = input_ids.to(p.device).expand(b, t)
    out = model(pixel_values=pixels.to(p.device, p.dtype), input_ids=ids, attention_mask=torch.ones_like(ids),
                token_type_ids=torch.zeros_like(ids), pixel_mask=torch.ones(b, *pixels.shape[-2:], dtype=torch.long,
                                                                                device=p.device))
    return out.logits[..., :t].float().sigmoid(), out.pred_boxes.float()


@dataclass
class Detection:
    """Boxes kept for one image: (N, 4) x0, y0, x1, y1 in pixels, their scores and phrase indices."""

    boxes: torch.Tensor
    scores: torch.Tensor
    phrases: list[list[int]] = field(default_factory=list)


def select_boxes(probs: torch.Tensor, boxes: torch.Tensor, token_phrase: torch.Tensor, height: int, width: int,
                 box_threshold: float, text_threshold: float, best_only: bool) -> Detection:
    """One image's detections, as Grounded-SAM: a query is kept when its highest probability over the
    prompt's phrase tokens reaches ``box_threshold`` and some token reaches ``text_threshold`` (the
    tokens above it name its phrases). ``best_only`` keeps only the highest-scoring query, if it
    passes. probs (Q, T), boxes (Q, 4) cx, cy, w, h in [0, 1]."""
    phrase_tokens = token_phrase.to(probs.device) >= 0
    p = probs[:, phrase_tokens]
    owner = token_phrase.to(probs.device)[phrase_tokens]
    scores = p.max(dim=1).values
    keep = (scores >= box_threshold) & (scores >= text_threshold)
    if best_only:
        best = torch.zeros_like(keep)
        best[scores.argmax()] = True
        keep &= best
    idx = keep.nonzero().flatten()
    cx, cy, w, h = boxes[idx].unbind(-1)
    scale = torch.tensor([width, height, width, height], device=boxes.device, dtype=boxes.dtype)
    xyxy = (torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * scale)
    xyxy = torch.stack([xyxy[:, 0].clamp(0, width), xyxy[:, 1].clamp(0, height),
                        xyxy[:, 2].clamp(0, width), xyxy[:, 3].clamp(0, height)], -1)
    phrases = [sorted({int(o) for o in owner[p[i] >= text_threshold]}) for i in idx.tolist()]
    return Detection(xyxy, scores[idx], phrases)


# -- segmentation --------------------------------------------------------------------------------
def sam_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """SAM's resize (ResizeLongestSide.get_preprocess_shape): the longer side ``size``, halves rounded up."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_inputs(image: torch.Tensor, size: int = 1024) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> SAM's input (B, 3, size, size): resized by ``sam_shape``,
    normalised, zero-padded right and bottom."""
    nh, nw = sam_shape(*image.shape[-2:], size)
    x = F.interpolate(image.float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(SAM_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(SAM_STD, device=x.device).view(1, 3, 1, 1)
    return F.pad((x - mean) / std, (0, size - nw, 0, size - nh))


def sam_boxes(boxes: torch.Tensor, height: int, width: int, size: int = 1024) -> torch.Tensor:
    """Boxes (N, 4) x0, y0, x1, y1 in image pixels -> SAM input pixels, each axis by its own factor
    (ResizeLongestSide.apply_boxes_torch)."""
    nh, nw = sam_shape(height, width, size)
    return boxes * torch.tensor([nw / width, nh / height, nw / width, nh / height], device=boxes.device,
                                dtype=boxes.dtype)


@torch.no_grad()
def sam_embeddings(sam: Sam, pixels: torch.Tensor) -> torch.Tensor:
    """Image embeddings (B, 256, 64, 64) of SAM inputs (B, 3, 1024, 1024)."""
    p = next(sam.model.parameters())
    return sam.model.get_image_embeddings(pixels.to(p.device, p.dtype))


@torch.no_grad()
def sam_decode(sam: Sam, embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution mask logits (N, 256, 256) and IoU estimates (N,) for one image's embedding
    (1, 256, 64, 64) and boxes (N, 4) in SAM input pixels; one mask per box."""
    p = next(sam.model.parameters())
    out = sam.model(image_embeddings=embeddings.to(p.device, p.dtype), input_boxes=boxes[None].to(p.device, p.dtype),
                    multimask_output=False)
    return out.pred_masks[0, :, 0].float(), out.iou_scores[0, :, 0].float()


def masks_to_image(low_res: torch.Tensor, height: int, width: int, size: int = 1024) -> torch.Tensor:
    """SAM logits (N, 256, 256) -> boolean masks (N, height, width) of the original image
    (Sam.postprocess_masks, then logits > 0)."""
    nh, nw = sam_shape(height, width, size)
    x = F.interpolate(low_res[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return F.interpolate(x[..., :nh, :nw], size=(height, width), mode="bilinear", align_corners=False)[:, 0] > 0.0


def segment(sam: Sam, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The union of SAM's masks for ``boxes`` (N, 4, pixels) on one image (3, H, W): (H, W) bool."""
    h, w = image.shape[-2:]
    if boxes.shape[0] == 0:
        return torch.zeros(h, w, dtype=torch.bool, device=image.device)
    low_res, _ = sam_decode(sam, sam_embeddings(sam, sam_inputs(image[None])), sam_boxes(boxes, h, w))
    return masks_to_image(low_res, h, w).to(image.device).any(dim=0)


# -- mask refinement and preview -----------------------------------------------------------------
def refine_mask(mask: torch.Tensor, dilate: int = 0, feather: float = 0.0) -> torch.Tensor:
    """(B, H, W) in [0, 1] -> (B, H, W): grown (``dilate`` > 0) or shrunk (< 0) by that many pixels
    with a square max filter, then softened by a Gaussian of sigma ``feather`` pixels. Both steps are
    monotone: a smaller mask stays smaller everywhere."""
    m = mask.float()[:, None]
    r = int(dilate)
    if r > 0:
        m = F.max_pool2d(F.pad(m, (r, r, r, r), value=0.0), 2 * r + 1, stride=1)
    elif r < 0:
        m = -F.max_pool2d(F.pad(-m, (-r, -r, -r, -r), value=-1.0), -2 * r + 1, stride=1)
    if feather > 0:
        k = int(math.ceil(3 * feather))
        x = torch.arange(-k, k + 1, device=m.device, dtype=m.dtype)
        g = torch.exp(-0.5 * (x / feather) ** 2)
        g = g / g.sum()
        m = F.conv2d(F.pad(m, (k, k, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
        m = F.conv2d(F.pad(m, (0, 0, k, k), mode="replicate"), g.view(1, 1, -1, 1))
    return m[:, 0].clamp(0.0, 1.0)


def overlay(image: torch.Tensor, mask: torch.Tensor, detections: list[Detection], color=(1.0, 0.2, 0.2),
            alpha: float = 0.5) -> torch.Tensor:
    """Preview (B, 3, H, W): the mask tinted over the image, each kept box outlined in green."""
    c = torch.tensor(color, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    a = alpha * mask.to(image.device, image.dtype)[:, None]
    out = image * (1 - a) + c * a
    h, w = image.shape[-2:]
    t = max(1, round(min(h, w) / 200))
    green = torch.tensor([0.1, 1.0, 0.1], device=image.device, dtype=image.dtype).view(3, 1, 1)
    for i, det in enumerate(detections):
        for x0, y0, x1, y1 in det.boxes.round().long().tolist():
            x0, x1 = min(max(x0, 0), w - 1), min(max(x1, 1), w)
            y0, y1 = min(max(y0, 0), h - 1), min(max(y1, 1), h)
            out[i, :, y0:y1, x0:x0 + t] = green
            out[i, :, y0:y1, max(x1 - t, 0):x1] = green
            out[i, :, y0:y0 + t, x0:x1] = green
            out[i, :, max(y1 - t, 0):y1, x0:x1] = green
    return out.clamp(0, 1)


def grounded_masks(dino: GroundingDino, sam: Sam, images: torch.Tensor, prompt: str, box_threshold: float,
                   text_threshold: float, best_only: bool = False, detect_size: int = 800,
                   on_image=None) -> tuple[torch.Tensor, list[Detection]]:
    """The union mask of every image: (B, H, W) bool on the images' device, and the detections.
    ``on_image(i)`` is called after image i (progress, interruption). An image with no detection
    gets an empty mask; the batch is never cut or reordered."""
    phrases = parse_phrases(prompt)
    input_ids, owner = tokenize_phrases(dino.tokenizer, phrases, dino.model.config.max_text_len)
    b, _, h, w = images.shape
    masks = torch.zeros(b, h, w, dtype=torch.bool, device=images.device)
    detections = []
    detect_size = fit_detect_size(detect_size, h, w, dino.model.config.num_queries)
    for i in range(b):
        image = images[i]
        probs, boxes = dino_forward(dino, dino_inputs(image[None].to(next(dino.model.parameters()).device), detect_size), input_ids)
        det = select_boxes(probs[0], boxes[0], owner, h, w, box_threshold, text_threshold, best_only)
        det = Detection(det.boxes.cpu(), det.scores.cpu(), det.phrases)
        masks[i] = segment(sam, image.to(next(sam.model.parameters()).device), det.boxes).to(images.device)
        detections.append(det)
        if on_image is not None:
            on_image(i)
    return masks, detections
