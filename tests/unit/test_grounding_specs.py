"""eqdiff_core.grounding's reading of a checkpoint's architecture from its tensor shapes (dino_spec,
sam_spec, DinoSpec.config) and its mapping of the original GroundingDINO / SAM key names to transformers'
(convert_dino_state, convert_sam_state, fit_names), on the released checkpoints' shapes (the factory's
shapes.json) and on small hand-built state dicts of meta tensors whose right answer is plain."""

from __future__ import annotations

import re

import pytest
import torch

from eqdiff_core import grounding as core
from grounding_files import meta_state, released_shapes


@pytest.fixture(scope="module")
def real_shapes():
    return released_shapes()


def _swin(embed, depths, heads, window) -> dict:
    """A Swin backbone's shapes: patch embedding, one norm per block, stage i's bias table ((2w-1)^2, heads)."""
    state = {"backbone.0.patch_embed.proj.weight": (embed, 3, 4, 4)}
    for i, (depth, h) in enumerate(zip(depths, heads)):
        state[f"backbone.0.layers.{i}.blocks.0.attn.relative_position_bias_table"] = ((2 * window - 1) ** 2, h)
        state |= {f"backbone.0.layers.{i}.blocks.{j}.norm1.weight": (embed * 2 ** i,) for j in range(depth)}
    return meta_state(state)


def _dino_rest(d_model=256, enc=6, dec=6, ffn=2048, queries=900, levels=4, text=768, bert_layers=12, vocab=30522):
    """GroundingDINO's transformer and text parts; bert_layers 0: a file without BERT weights."""
    state = {"transformer.level_embed": (levels, d_model), "feat_map.weight": (d_model, text),
             "transformer.tgt_embed.weight": (queries, d_model)}
    state |= {f"transformer.encoder.layers.{k}.linear1.weight": (ffn, d_model) for k in range(enc)}
    state |= {f"transformer.decoder.layers.{k}.linear1.weight": (ffn, d_model) for k in range(dec)}
    if bert_layers:
        state["bert.embeddings.word_embeddings.weight"] = (vocab, text)
        state |= {f"bert.encoder.layer.{k}.attention.self.query.weight": (text, text) for k in range(bert_layers)}
    return meta_state(state)


def test_the_released_swint_ogc_architecture_is_read_in_full(real_shapes):
    """GroundingDINO_SwinT_OGC.py: Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7), hidden_dim 256,
    6 encoder and 6 decoder layers, dim_feedforward 2048, 900 queries, 4 feature levels; bert-base-uncased: 768
    wide, 12 layers, a 30522-token vocabulary."""
    state = meta_state(real_shapes["swin_T_224_1k"]) | _dino_rest()
    assert core.dino_spec(state) == core.DinoSpec(
        "Swin-T", embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, d_model=256,
        encoder_layers=6, decoder_layers=6, encoder_ffn_dim=2048, decoder_ffn_dim=2048, num_queries=900,
        num_feature_levels=4, text_hidden=768, text_layers=12, text_vocab=30522, has_bert=True)


def test_an_unknown_swin_without_bert_is_read_from_its_shapes():
    """A one-stage Swin of embed 64, window 5, is no released variant: it is named by its embed and depths;
    a file without bert.* weights has no text layers and no vocabulary (both 0)."""
    spec = core.dino_spec(_swin(64, (3,), (2,), 5) | _dino_rest(d_model=128, text=32, bert_layers=0))
    assert (spec.variant, spec.embed_dim, spec.depths, spec.num_heads, spec.window_size) == (
        "Swin (embed 64, depths [3])", 64, (3,), (2,), 5)
    assert (spec.d_model, spec.text_hidden, spec.text_layers, spec.text_vocab, spec.has_bert) == (128, 32, 0, 0, False)


def test_count_is_one_past_the_highest_index_and_zero_without_a_match():
    state = {"a.0.x": 0, "a.4.y": 0, "b.9.z": 0}  # index 4 is the highest under a.: 5 (indexes 0..4)
    assert core._count(state, r"a\.(\d+)\.") == 5
    assert core._count(state, r"c\.(\d+)\.") == 0


def test_a_file_that_is_not_groundingdino_is_refused_with_the_whole_message():
    """Either of the two tensors missing is enough; the SAM hint only when image_encoder.* weights are there."""
    sam_like = {"image_encoder.patch_embed.proj.weight": torch.empty(1)}
    with pytest.raises(core.GroundingError, match=re.escape(
            "the file is not an original GroundingDINO checkpoint (no backbone.0.patch_embed / transformer.level_embed "
            "weights). It looks like a SAM checkpoint: put it in models/sams.") + "$"):
        core.dino_spec(sam_like)
    with pytest.raises(core.GroundingError, match=re.escape(
            "the file is not an original GroundingDINO checkpoint (no backbone.0.patch_embed / transformer.level_embed "
            "weights).") + "$"):
        core.dino_spec({"backbone.0.patch_embed.proj.weight": torch.empty(1)})  # no transformer.level_embed


def test_a_file_that_is_not_sam_is_refused_with_the_whole_message():
    """Either of the two tensors missing is enough; the GroundingDINO hint only with transformer.level_embed."""
    with pytest.raises(core.GroundingError, match=re.escape(
            "the file is not an original SAM checkpoint (no image_encoder.patch_embed / mask_decoder weights). It "
            "looks like a GroundingDINO checkpoint: put it in models/grounding-dino. HQ-SAM and MobileSAM files are "
            "not supported.") + "$"):
        core.sam_spec({"transformer.level_embed": torch.empty(1)})
    with pytest.raises(core.GroundingError, match=re.escape(
            "the file is not an original SAM checkpoint (no image_encoder.patch_embed / mask_decoder weights). HQ-SAM "
            "and MobileSAM files are not supported.") + "$"):
        core.sam_spec({"image_encoder.patch_embed.proj.weight": torch.empty(1)})  # no mask_decoder.iou_token


@pytest.mark.parametrize("variant,name,hidden,layers,heads,globals_", [
    ("vit_h", "ViT-H", 1280, 32, 16, [7, 15, 23, 31]), ("vit_l", "ViT-L", 1024, 24, 16, [5, 11, 17, 23]),
    ("vit_b", "ViT-B", 768, 12, 12, [2, 5, 8, 11])])
def test_the_released_sam_architectures_are_read_in_full(real_shapes, variant, name, hidden, layers, heads, globals_):
    """segment-anything's build_sam.py: mlp_ratio 4, window 14, image 1024, patch 16, neck out_chans 256."""
    assert core.sam_spec(meta_state(real_shapes[f"sam_{variant}"])) == core.SamSpec(
        name, hidden_size=hidden, num_layers=layers, num_heads=heads, mlp_dim=4 * hidden, window_size=14,
        global_attn_indexes=globals_, image_size=1024, patch_size=16, output_channels=256)


def _sam(hidden, grid, patch, head_dim, windows, mlp, out) -> dict:
    """A SAM image encoder's shapes; windows[i] None: block i attends globally (rel_pos (2 grid - 1, head_dim))."""
    state = {"image_encoder.patch_embed.proj.weight": (hidden, 3, patch, patch),
             "mask_decoder.iou_token.weight": (1, 256), "image_encoder.pos_embed": (1, grid, grid, hidden),
             "image_encoder.neck.0.weight": (out, hidden, 1, 1)}
    for i, w in enumerate(windows):
        state[f"image_encoder.blocks.{i}.attn.rel_pos_h"] = (2 * (w or grid) - 1, head_dim)
        state[f"image_encoder.blocks.{i}.mlp.lin1.weight"] = (mlp, hidden)
    return meta_state(state)


def test_an_unknown_sam_is_read_from_its_shapes():
    """Block 0 global on an 8 x 8 grid (15 relative positions), block 1 windowed 5 x 5 (9): window 5, global [0]."""
    assert core.sam_spec(_sam(48, 8, 4, 16, [None, 5], mlp=100, out=32)) == core.SamSpec(
        "ViT (dim 48, 2 blocks)", hidden_size=48, num_layers=2, num_heads=3, mlp_dim=100, window_size=5,
        global_attn_indexes=[0], image_size=32, patch_size=4, output_channels=32)


def test_a_sam_without_windowed_blocks_keeps_the_default_window():
    """Nothing to read the window from: SamVisionConfig's default window_size, 14."""
    spec = core.sam_spec(_sam(32, 6, 2, 8, [None], mlp=64, out=16))
    assert (spec.num_layers, spec.num_heads, spec.window_size, spec.global_attn_indexes) == (1, 4, 14, [0])


@pytest.mark.parametrize("window,image_size", [(7, 224), (12, 384)])
def test_the_dino_config_carries_every_field_of_the_spec(window, image_size):
    """Values unlike the defaults (SwinConfig: depths 2-2-6-2; GroundingDinoConfig: d_model 256, 6 + 6 layers,
    FFN 2048, 900 queries, 4 levels). The released backbones: swin_T_224_1k (window 7, 224 px) and
    swin_B_384_22k (window 12, 384 px)."""
    spec = core.DinoSpec("Swin-B", embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=window,
                         d_model=128, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=300, decoder_ffn_dim=400,
                         num_queries=50, num_feature_levels=3, text_hidden=32, text_layers=1, text_vocab=100,
                         has_bert=True)
    c = spec.config({"model_type": "bert", "hidden_size": 32})
    b = c.backbone_config
    assert (b.embed_dim, b.depths, b.num_heads, b.window_size, b.image_size) == (
        128, [2, 2, 18, 2], [4, 8, 16, 32], window, image_size)
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_ffn_dim, c.decoder_ffn_dim, c.num_queries,
            c.num_feature_levels, c.text_config.hidden_size) == (128, 2, 3, 300, 400, 50, 3, 32)


def test_dino_keys_without_a_transformers_name_are_dropped():
    """The BERT pooler (transformers builds the text backbone without it), the decoder's copy of bbox_embed.*
    and keys no table knows are left out; the others keep their place. A fused torch MHA projection is split in
    three along its rows, at the name's last ".in_proj_"."""
    t = torch.zeros(1)
    fused = torch.arange(6.0).reshape(6, 1)
    state = {"transformer.decoder.bbox_embed.0.layers.0.weight": t, "bert.pooler.dense.weight": t,
             "backbone.0.layers.0.blocks.0.attn.unknown": t, "transformer.encoder.layers.0.unknown": t,
             "transformer.decoder.layers.0.unknown": t, "unknown.weight": t, "transformer.level_embed": t,
             "bert.in_proj_x.in_proj_bias": fused}
    out = core.convert_dino_state(state)
    assert list(out) == ["model.level_embed", "model.text_backbone.in_proj_x.query.bias",
                         "model.text_backbone.in_proj_x.key.bias", "model.text_backbone.in_proj_x.value.bias"]
    assert [v.flatten().tolist() for v in out.values()][1:] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]


def test_fit_names_renames_only_names_the_model_does_not_know_into_names_it_knows():
    old = "model.backbone.conv_encoder.model.encoder.layers.0.blocks.0.attention.self.query.weight"  # 4.x
    new = "model.backbone.conv_encoder.model.swin.encoder.layers.0.blocks.0.attention.q_proj.weight"  # 5.x
    unknown = "model.backbone.conv_encoder.model.encoder.layers.9.blocks.0.attention.self.query.weight"
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    out = core.fit_names({old: a, "model.level_embed": b, unknown: c}, {new: None, "model.level_embed": None})
    assert out == {new: a, "model.level_embed": b, unknown: c}  # the same tensors: dict == compares them by identity
    assert core.fit_names({old: a}, {old: None, new: None}) == {old: a}, "a known name stays"


def test_sam_pixel_statistics_are_dropped():
    """pixel_mean / pixel_std are preprocessing constants, not SamModel weights; the keys after them are kept,
    and the prompt encoder's Gaussian matrix is also the model's shared image embedding."""
    g = torch.ones(2, 64)
    out = core.convert_sam_state({"pixel_mean": torch.zeros(3, 1, 1), "pixel_std": torch.ones(3, 1, 1),
                                  "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": g})
    assert out == {"prompt_encoder.shared_embedding.positional_embedding": g,  # g itself (dict == checks identity)
                   "shared_image_embedding.positional_embedding": g}
