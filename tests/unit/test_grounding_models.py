"""eqdiff_core.grounding's models without ComfyUI: GroundingDINO and SAM checkpoints written by the
original libraries (tests/grounding_factory.py: groundingdino-py's SwinT_OGC config with 1 encoder and 2
decoder layers, 12 queries, FFN 512, a 32-wide BERT; segment-anything's ViT with embed 64, depth 2, global
attention at block 1) read, converted and run by the core, and held to those libraries' outputs.
Runs under transformers 4.x and 5.x (scripts/test.sh)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from eqdiff_core import grounding as core
from grounding_files import assert_matches_reference, factory_files, meta_state, reference, released_shapes


@pytest.fixture(scope="module")
def files():
    return factory_files()


@pytest.fixture(scope="module")
def dino_state(files):
    return core.read_checkpoint(files / "grounding-dino" / "tiny_swint.pth")


@pytest.fixture(scope="module")
def sam_state(files):
    return core.read_checkpoint(files / "sams" / "tiny_vit.safetensors")


@pytest.fixture(scope="module")
def dino(files, dino_state):
    return core.build_dino(dino_state, [files / "missing", files / "grounding-dino"])


@pytest.fixture(scope="module")
def sam(sam_state):
    return core.build_sam(sam_state)


def _message(call, *args) -> str:
    """The message of the GroundingError that call(*args) raises, as the user reads it."""
    with pytest.raises(core.GroundingError) as e:
        call(*args)
    return str(e.value)


def test_the_core_models_reproduce_the_original_implementations(files, dino, sam):
    assert_matches_reference(core, dino, sam, reference(files))


def test_the_architecture_is_read_from_the_weights(dino, sam):
    spec = dino.spec
    assert (spec.variant, spec.embed_dim, spec.depths, spec.num_heads, spec.window_size) == (
        "Swin-T", 96, (2, 2, 6, 2), (3, 6, 12, 24), 7)  # SwinT_OGC's backbone
    assert (spec.encoder_layers, spec.decoder_layers, spec.num_queries, spec.encoder_ffn_dim) == (1, 2, 12, 512)
    assert (spec.d_model, spec.num_feature_levels, spec.text_hidden, spec.has_bert) == (256, 4, 32, True)
    assert (sam.spec.hidden_size, sam.spec.num_layers, sam.spec.global_attn_indexes) == (64, 2, [1])
    assert not dino.model.training and not any(p.requires_grad for p in dino.model.parameters())
    assert not sam.model.training and not any(p.requires_grad for p in sam.model.parameters())


def test_pth_and_safetensors_hold_the_same_tensors(files, dino_state):
    other = core.read_checkpoint(files / "grounding-dino" / "tiny_swint.safetensors")
    assert other.keys() == dino_state.keys()
    assert all(torch.equal(other[k], dino_state[k]) for k in other)


def test_a_checkpoint_with_a_missing_or_misshapen_tensor_is_refused_by_name(sam_state, dino_state, files):
    """The message names the first 5 missing or 3 misshapen tensors, in the model's order (transformers'
    SamFeedForward: proj_in, proj_out, then the hidden layers; the original's layers.0, layers.2, layers.1)."""
    head = "mask_decoder.iou_prediction_head."
    missing = {k: v for k, v in sam_state.items() if not k.startswith(head)}  # all 6 of the IoU head
    assert _message(core.build_sam, missing, "my_sam.pth") == (
        f"my_sam.pth does not fit the SAM ViT (dim 64, 2 blocks) architecture read from it: missing "
        f"{head}proj_in.weight, {head}proj_in.bias, {head}proj_out.weight, {head}proj_out.bias, {head}layers.0.weight. "
        f"The file may be truncated or a variant this pack does not support.")
    bent = {**sam_state, **{head + k: sam_state[head + k][..., :-1] for k in
                            ("layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.2.weight")}}
    assert _message(core.build_sam, bent) == (
        f"the file does not fit the SAM ViT (dim 64, 2 blocks) architecture read from it: "
        f"{head}proj_in.weight (256, 255) (expected (256, 256)); {head}proj_in.bias (255,) (expected (256,)); "
        f"{head}proj_out.weight (4, 255) (expected (4, 256)). The file may be truncated or a variant this pack does "
        f"not support.")
    key = "transformer.decoder.layers.1.linear1.weight"
    bent = {**dino_state, key: dino_state[key][:, :-1]}
    with pytest.raises(core.GroundingError, match=r"the file does not fit the GroundingDINO Swin-T architecture read from it: "
                       r"model\.decoder\.layers\.1\.fc1\.weight \(512, 255\) \(expected \(512, 256\)\)"):
        core.build_dino(bent, [files / "grounding-dino"])


def test_grounded_masks_keep_the_batch_and_union_the_boxes(dino, sam):
    """SAM runs at 1024 px whatever the image size, so this test keeps to five SAM passes."""
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    seen = []
    masks, detections = core.grounded_masks(dino, sam, images, "cat . red dog", 0.0, 0.0, best_only=True,
                                            detect_size=128, on_image=seen.append)
    assert masks.shape == (2, 96, 128) and masks.dtype == torch.bool and seen == [0, 1]
    assert [d.boxes.shape for d in detections] == [(1, 4)] * 2 and [d.scores.shape for d in detections] == [(1,)] * 2
    assert [d.phrases for d in detections] == [[[0, 1]]] * 2, "text threshold 0: every token names its phrase"
    assert torch.equal(masks[1], core.segment(sam, images[1], detections[1].boxes)), "SAM's mask for the kept box"
    alone, alone_dets = core.grounded_masks(dino, sam, images[1:], "cat . red dog", 0.0, 0.0, best_only=True,
                                            detect_size=128)
    assert torch.equal(alone[0], masks[1]) and torch.equal(alone_dets[0].boxes, detections[1].boxes), \
        "an image's mask does not depend on its place in the batch"
    every, every_dets = core.grounded_masks(dino, sam, images[:1], "cat . red dog", 0.0, 0.0, detect_size=128)
    assert every_dets[0].boxes.shape[0] == dino.spec.num_queries, "threshold 0 keeps every query's box"
    assert (every[0] >= masks[0]).all() and every[0].sum() > masks[0].sum(), "the union of all boxes' masks"
    none, nothing = core.grounded_masks(dino, sam, images, "cat", 1.01, 0.0, detect_size=128)
    assert not none.any() and all(d.boxes.shape[0] == 0 for d in nothing), "no score exceeds 1: nothing kept"
    empty = core.segment(sam, images[0], torch.zeros(0, 4))
    assert empty.shape == (96, 128) and empty.dtype == torch.bool and not empty.any()


def test_the_detection_size_defaults_to_groundingdinos_800(dino, sam):
    """Grounded-SAM's demo prepares images with RandomResize([800], max_size=1333): with no size given,
    the detections are those at 800 px, to the bit (another size moves every box a little)."""
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(4))
    _, default = core.grounded_masks(dino, sam, image, "cat", 0.0, 0.0, best_only=True)
    _, at_800 = core.grounded_masks(dino, sam, image, "cat", 0.0, 0.0, best_only=True, detect_size=800)
    _, at_832 = core.grounded_masks(dino, sam, image, "cat", 0.0, 0.0, best_only=True, detect_size=832)
    assert torch.equal(default[0].boxes, at_800[0].boxes) and torch.equal(default[0].scores, at_800[0].scores)
    assert not torch.equal(default[0].scores, at_832[0].scores)


def test_a_prompt_longer_than_the_text_window_is_cut_to_it(dino, sam):
    """GroundingDINO reads at most max_text_len (256) tokens: 130 phrases "dog ." are 262 tokens with
    [CLS] and [SEP], so the caption is cut after the 128th "dog" (token 256) and only phrases 0..127
    can name a box."""
    assert dino.model.config.max_text_len == 256
    image = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(3))
    _, detections = core.grounded_masks(dino, sam, image, " . ".join(["dog"] * 130), 0.0, 0.0, best_only=True,
                                        detect_size=128)
    assert detections[0].phrases == [list(range(128))]


def test_bert_folder_checks(files, tmp_path):
    state = core.read_checkpoint(files / "grounding-dino" / "tiny_swint.safetensors")
    bert = tmp_path / core.BERT_FOLDER
    shutil.copytree(files / "grounding-dino" / core.BERT_FOLDER, bert)
    vocab = (bert / "vocab.txt").read_text().splitlines()
    vocab[101], vocab[102] = vocab[102], vocab[101]
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bert / extra).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="not bert-base-uncased's"):
        core.build_dino(state, [tmp_path])
    no_bert = {k: v for k, v in state.items() if not k.startswith("bert.")}  # weights from the folder instead
    dino = core.build_dino(no_bert, [files / "grounding-dino"])
    assert not dino.spec.has_bert


def _bert_folder(files, where, **config):
    """A copy of the factory's BERT folder in where/, its config.json updated (None: the key removed)."""
    bert = where / core.BERT_FOLDER
    shutil.copytree(files / "grounding-dino" / core.BERT_FOLDER, bert)
    cfg = json.loads((bert / "config.json").read_text()) | config
    (bert / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return bert


def test_a_bert_folder_that_does_not_fit_is_refused_with_what_to_put_there(files, dino_state, tmp_path):
    spec = core.dino_spec(dino_state)  # its text encoder is 32 wide
    bert = _bert_folder(files, tmp_path / "unreadable")
    (bert / "config.json").write_text("{")
    with pytest.raises(ValueError) as json_error:
        json.loads("{")  # json's own words, quoted by the message
    assert _message(core.load_bert_parts, bert, spec) == (
        f"{bert / 'config.json'} cannot be read ({json_error.value}); it must be bert-base-uncased's config.json.")
    bert = _bert_folder(files, tmp_path / "roberta", model_type="roberta")
    assert _message(core.load_bert_parts, bert, spec) == (
        f"{bert / 'config.json'} describes a roberta model; GroundingDINO needs bert-base-uncased's config.json.")
    bert = _bert_folder(files, tmp_path / "wide", hidden_size=64)
    assert _message(core.load_bert_parts, bert, spec) == (
        f"{bert / 'config.json'} has hidden_size 64 but the GroundingDINO file's text encoder has 32; use the BERT "
        f"it was trained with (bert-base-uncased).")
    bert = _bert_folder(files, tmp_path / "default", hidden_size=None)  # BERT's default: 768 (bert-base)
    assert _message(core.load_bert_parts, bert, spec) == (
        f"{bert / 'config.json'} has hidden_size 768 but the GroundingDINO file's text encoder has 32; use the BERT "
        f"it was trained with (bert-base-uncased).")
    bert = _bert_folder(files, tmp_path / "no_weights")
    (bert / "model.safetensors").unlink()
    assert _message(core.load_bert_parts, bert, dataclasses.replace(spec, has_bert=False)) == (
        f"The GroundingDINO file holds no BERT weights and {bert} has no model.safetensors; put bert-base-uncased's "
        f"model.safetensors there.")
    from transformers import BertTokenizerFast

    bert = _bert_folder(files, tmp_path / "bad_tokenizer")
    (bert / "vocab.txt").unlink()
    (bert / "tokenizer.json").write_text("not json")
    with pytest.raises(Exception) as tokenizer_error:  # the tokenizer library's own error, quoted by the message
        BertTokenizerFast.from_pretrained(str(bert), local_files_only=True)
    assert _message(core.load_bert_parts, bert, spec) == (
        f"The tokenizer in {bert} cannot be loaded ({type(tokenizer_error.value).__name__}: {tokenizer_error.value}); "
        f"it needs bert-base-uncased's vocab.txt or tokenizer.json.")
    assert type(tokenizer_error.value).__name__ not in ("NoneType", "GroundingError")


def test_a_bert_folder_may_leave_out_bert_defaults_and_prefix_its_weights(files, dino_state, tmp_path):
    """model_type and hidden_size default to BERT's ("bert", 768); transformers' bookkeeping keys are
    dropped; weights saved with or without the "bert." prefix (BertForPreTraining as on the hub, or
    BertModel) become the GroundingDINO file's bert.* names."""
    spec = dataclasses.replace(core.dino_spec(dino_state), text_hidden=768, has_bert=False)
    bookkeeping = {"architectures": ["BertForMaskedLM"], "transformers_version": "4.6.0.dev0",
                   "_name_or_path": "bert-base-uncased", "torch_dtype": "float32", "dtype": "float32"}
    bert = _bert_folder(files, tmp_path, model_type=None, hidden_size=None, **bookkeeping)
    plain = core.read_checkpoint(bert / "model.safetensors")
    assert not any(k.startswith("bert.") for k in plain)
    save_file({"bert." + k: v for k, v in plain.items()}, str(bert / "model.safetensors"))
    config, tokenizer, weights = core.load_bert_parts(bert, spec)
    written = json.loads((bert / "config.json").read_text())
    assert config == {k: v for k, v in written.items() if k not in bookkeeping}
    assert "model_type" not in config and "hidden_size" not in config and "architectures" in written
    assert tokenizer.convert_tokens_to_ids("[SEP]") == 102
    assert weights.keys() == {"bert." + k for k in plain}
    assert all(torch.equal(weights["bert." + k], v) for k, v in plain.items())


def test_the_bert_folder_is_the_first_with_config_and_vocabulary_to_depth_4(tmp_path):
    def bert(*parts, names=("config.json", "vocab.txt")):
        folder = tmp_path.joinpath(*parts)
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_text("")
        return folder

    depth4 = bert("a", "1", "2", "3", "4")  # the candidate itself is depth 0
    assert core.find_bert_folder([tmp_path / "a"]) == depth4
    bert("b", "1", "2", "3", "4", "5")  # depth 5: not read, and searched before b/z: the search goes on past it
    shallow = bert("b", "z")
    assert core.find_bert_folder([tmp_path / "b"]) == shallow
    bert("c", "a", names=("config.json",))
    bert("c", "b", names=("vocab.txt",))
    fast = bert("c", "c", names=("config.json", "tokenizer.json"))
    assert core.find_bert_folder([tmp_path / "missing", tmp_path / "c"]) == fast


def test_without_a_bert_folder_the_message_says_what_to_put_where(dino_state, tmp_path):
    assert _message(core.build_dino, dino_state, [tmp_path / "models" / "grounding-dino", str(tmp_path / "bert")]) == (
        f"GroundingDINO needs the BERT text encoder's files from a local folder (nothing is downloaded). Put "
        f"config.json and vocab.txt (or tokenizer.json), plus model.safetensors when the GroundingDINO file holds no "
        f"bert.* weights of bert-base-uncased into a folder 'bert-base-uncased' inside one of: "
        f"{tmp_path}/models/grounding-dino, {tmp_path}/bert.")


def test_computed_buffers_are_built_by_the_model_not_read_from_the_file(files, dino_state):
    """Swin's relative-position index is a function of the window; a file's copy (here zeroed) is not read."""
    key = "backbone.0.layers.0.blocks.0.attn.relative_position_index"
    model = core.build_dino({**dino_state, key: torch.zeros_like(dino_state[key])}, [files / "grounding-dino"]).model
    built = [v for k, v in model.named_buffers()
             if ".layers.0.blocks.0." in k and k.endswith("relative_position_index")]
    # groundingdino-py's own table (transformers 5 keeps it flat)
    assert len(built) == 1 and torch.equal(built[0].flatten(), dino_state[key].flatten())


# -- real-size variants: architecture and key mapping, on meta tensors ---------------------------
@pytest.fixture(scope="module")
def real_shapes():
    return released_shapes()


def _assert_fits(model, converted):
    expected = model.state_dict()
    converted = core.fit_names(converted, expected)
    skip = ("relative_position_index", "position_ids", "token_type_ids", "special_tokens", "swin.layernorm")
    missing = [k for k in expected if k not in converted and not any(s in k for s in skip)]
    wrong = [k for k, v in expected.items() if k in converted and tuple(converted[k].shape) != tuple(v.shape)]
    assert not missing and not wrong, (missing[:5], wrong[:5])


@pytest.mark.parametrize("variant,name,layers,globals_", [
    ("vit_h", "ViT-H", 32, [7, 15, 23, 31]), ("vit_l", "ViT-L", 24, [5, 11, 17, 23]), ("vit_b", "ViT-B", 12, [2, 5, 8, 11])])
def test_sam_variants_from_weights(real_shapes, variant, name, layers, globals_):
    from transformers import SamModel

    state = meta_state(real_shapes[f"sam_{variant}"])
    spec = core.sam_spec(state)
    assert (spec.variant, spec.num_layers, spec.global_attn_indexes, spec.window_size) == (name, layers, globals_, 14)
    with torch.device("meta"):
        model = SamModel(spec.config())
    _assert_fits(model, core.convert_sam_state(state))


@pytest.mark.parametrize("backbone,name,window,heads", [
    ("swin_T_224_1k", "Swin-T", 7, (3, 6, 12, 24)), ("swin_B_384_22k", "Swin-B", 12, (4, 8, 16, 32))])
def test_dino_variants_from_weights(real_shapes, files, backbone, name, window, heads):
    from transformers import GroundingDinoForObjectDetection

    tiny = core.read_checkpoint(files / "grounding-dino" / "tiny_swint.safetensors")
    state = {k: v for k, v in tiny.items() if not k.startswith("backbone.0.")} | meta_state(real_shapes[backbone])
    embed = state["backbone.0.patch_embed.proj.weight"].shape[0]
    for i, channels in enumerate((embed * 2, embed * 4, embed * 8, embed * 8)):  # the projections of its stages
        w = state[f"input_proj.{i}.0.weight"]
        state[f"input_proj.{i}.0.weight"] = torch.empty(w.shape[0], channels, *w.shape[2:], device="meta")
    spec = core.dino_spec(state)
    assert (spec.variant, spec.window_size, spec.num_heads) == (name, window, heads)
    text = json.loads((files / "grounding-dino" / core.BERT_FOLDER / "config.json").read_text())
    with torch.device("meta"):
        model = GroundingDinoForObjectDetection(spec.config(text))
    _assert_fits(model, core.convert_dino_state(state))


def test_the_sam_config_carries_every_field_of_the_spec():
    """Values unlike SamVisionConfig's defaults (mlp 4 x hidden, window 14, image 1024, patch 16, output 256)."""
    spec = core.SamSpec("ViT", hidden_size=64, num_layers=3, num_heads=4, mlp_dim=100, window_size=5,
                        global_attn_indexes=[2], image_size=512, patch_size=8, output_channels=32)
    v = spec.config().vision_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.mlp_dim, v.window_size, v.global_attn_indexes,
            v.image_size, v.patch_size, v.output_channels) == (64, 3, 4, 100, 5, [2], 512, 8, 32)


def test_a_file_of_another_kind_is_named(real_shapes, dino_state, sam_state, files):
    with pytest.raises(ValueError, match="looks like a GroundingDINO"):
        core.sam_spec({"transformer.level_embed": torch.empty(4, 256)})
    with pytest.raises(ValueError, match="not an original SAM"):
        core.sam_spec(meta_state(real_shapes["swin_T_224_1k"]))
    sam_message = ("is not an original SAM checkpoint (no image_encoder.patch_embed / mask_decoder weights). It looks "
                   "like a GroundingDINO checkpoint: put it in models/grounding-dino. HQ-SAM and MobileSAM files are "
                   "not supported.")
    assert _message(core.build_sam, dino_state) == f"the file {sam_message}"
    assert _message(core.build_sam, dino_state, "my_dino.pth") == f"my_dino.pth {sam_message}"
    assert _message(core.build_dino, sam_state, [files / "grounding-dino"], "my_sam.pth") == (
        "my_sam.pth is not an original GroundingDINO checkpoint (no backbone.0.patch_embed / transformer.level_embed "
        "weights). It looks like a SAM checkpoint: put it in models/sams.")




@pytest.mark.cuda
def test_masks_come_back_on_the_images_device_whatever_the_models_device(dino, sam):
    """Models on the CPU, images on the GPU: each step moves what it needs to its model and the masks
    come back to the images (the all-CPU result, on the GPU)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    images = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    want, want_dets = core.grounded_masks(dino, sam, images, "cat . red dog", 0.0, 0.0, best_only=True, detect_size=128)
    masks, dets = core.grounded_masks(dino, sam, images.cuda(), "cat . red dog", 0.0, 0.0, best_only=True,
                                      detect_size=128)
    assert masks.device.type == "cuda" and torch.equal(masks.cpu(), want)
    assert torch.equal(dets[0].boxes, want_dets[0].boxes) and dets[0].boxes.device.type == "cpu"
    one = core.segment(sam, images[0].cuda(), want_dets[0].boxes)
    assert one.device.type == "cuda" and torch.equal(one.cpu(), want[0])
    empty = core.segment(sam, images[0].cuda(), torch.zeros(0, 4))
    assert empty.device.type == "cuda" and empty.shape == (96, 128) and not empty.any()
