"""eqdiff_core.metrics: token stripping, preprocessing against the HF processors and the Custom Diffusion
protocol's torchvision pipelines, and the metrics against cosines computed by hand (numpy) from tiny
random-weight CLIP / DINO models built with transformers."""

import json
import math
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from eqdiff_core import metrics as M
from metric_models import CLIP_BPE, write_tiny_clip, write_tiny_dino, write_tiny_dinov2


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric_models")
    return {"clip": write_tiny_clip(root / "clip"), "dino": write_tiny_dino(root / "dino"),
            "dinov2": write_tiny_dinov2(root / "dinov2")}


def smooth_photo(height, width, seed):
    """A uint8 PIL photo with structure at several scales (upsampled noise), so that a 1 px shift
    or another filter shows."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((height // 6 + 2, width // 6 + 2, 3)) * 255).astype(np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


def as_tensor(*photos):
    return torch.stack([torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1) for p in photos]).float() / 255


@pytest.mark.parametrize("prompt, tokens, expected", [
    ("a <backpack_dog> backpack in the jungle", ["<backpack_dog>"], "a backpack in the jungle"),
    ("<backpack_dog> backpack oil painting ghibli inspired", ["<backpack_dog>"], "backpack oil painting ghibli inspired"),
    ("a photo of <cat>, <cat> cat", ["<cat>"], "a photo of, cat"),
    ("  a   <a>   dog  ", ["<a>"], "a dog"),
    ("a <backpack_dog>x backpack", ["<backpack_dog>"], "a <backpack_dog>x backpack"),  # part of another word
    ("a <<tok>> dog", ["<tok>"], "a <<tok>> dog"),                                     # touches < >
    ("a sks dog and a sksy dog", ["sks"], "a dog and a sksy dog"),
    ("a <x> and <xy> dog", ["<x>", "<xy>"], "a and dog"),
    ("a sks dog and a sks toy", ["sks", "sks dog"], "a and a toy"),  # the longer token first, where both match
    ("a <x> dog", [], "a <x> dog"),
])
def test_strip_concept_tokens(prompt, tokens, expected):
    assert M.strip_concept_tokens(prompt, tokens) == expected


def test_parse_tokens():
    assert M.parse_tokens(" <a>, <b>\n<c>  ") == ["<a>", "<b>", "<c>"]
    assert M.parse_tokens("") == []


@pytest.mark.parametrize("name", ["clip", "dino", "dinov2"])
@pytest.mark.parametrize("size", [(300, 451), (512, 512), (97, 211), (768, 577)])
def test_preprocessing_equals_the_hf_processor(folders, name, size):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folders[name], local_files_only=True, use_fast=False)
    transform = M.ImageTransform.from_hf_processor(processor)
    photo = smooth_photo(*size, seed=size[0])
    want = processor(images=photo, return_tensors="pt")["pixel_values"]
    got = transform(as_tensor(photo))
    assert got.shape == want.shape == (1, 3, 224, 224)
    diff = (got - want).abs()
    # PIL resizes in 8 bits (rounding after each pass): a few grey levels apart at most, a third of a
    # level on average (in units of the normalising std)
    assert diff.max() < 3.0 / 255 / min(processor.image_std)
    assert diff.mean() < 0.5 / 255 / min(processor.image_std)


@pytest.mark.parametrize("size", [(300, 451), (97, 211)])
def test_nearest_resampling_equals_the_hf_processors(size):
    """A processor with resample 0 (PIL NEAREST: the source pixel under each output pixel's centre) is
    reproduced exactly by 'nearest-exact' on the 8-bit photo."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 40}, resample=0, crop_size={"height": 32, "width": 32},
                                   image_mean=[0.5, 0.25, 0.125], image_std=[0.25, 0.5, 1.0])
    photo = smooth_photo(*size, seed=7)
    want = processor(images=photo, return_tensors="pt")["pixel_values"]
    got = M.ImageTransform.from_hf_processor(processor)(as_tensor(photo))
    assert got.shape == want.shape == (1, 3, 32, 32) and torch.allclose(got, want, atol=1e-5)


def test_preprocessing_stays_on_the_images_device():
    """Meta stands in for an accelerator: the mean and std are made where the images are."""
    out = M.ImageTransform(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))(torch.empty(2, 3, 8, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 3, 8, 8)


def test_custom_diffusion_transforms_are_the_protocols_torchvision_pipelines():
    from torchvision import transforms as T

    pipelines = {  # customconcept101/evaluate.py: CLIPImageDataset and DINOImageDataset
        "clip": (M.CUSTOM_DIFFUSION_CLIP, T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
                                                      T.CenterCrop(224), T.ToTensor(),
                                                      T.Normalize(M.CLIP_MEAN, M.CLIP_STD)])),
        "dino": (M.CUSTOM_DIFFUSION_DINO, T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
                                                      T.CenterCrop(224), T.ToTensor(),
                                                      T.Normalize(M.IMAGENET_MEAN, M.IMAGENET_STD)])),
    }
    for size in [(512, 512), (768, 577), (300, 451)]:  # even crop margins: torchvision rounds, HF floors
        photo = smooth_photo(*size, seed=1)
        for ours, theirs in pipelines.values():
            diff = (ours(as_tensor(photo)) - theirs(photo)[None]).abs()
            assert diff.max() < 3.0 / 255 / 0.224 and diff.mean() < 0.5 / 255 / 0.224


def test_preprocessing_channels_and_small_images():
    # PIL's convert("RGB"): gray repeated into R, G and B; an alpha channel dropped; RGB unchanged
    gray = torch.rand(2, 1, 40, 30)
    assert torch.equal(M.to_rgb(gray), torch.cat([gray, gray, gray], dim=1))
    rgba = torch.rand(1, 4, 50, 50)
    assert torch.equal(M.to_rgb(rgba), rgba[:, :3]) and torch.equal(M.to_rgb(rgba[:, :3]), rgba[:, :3])
    out = M.CUSTOM_DIFFUSION_CLIP(gray)
    undone = out * torch.tensor(M.CLIP_STD).view(1, 3, 1, 1) + torch.tensor(M.CLIP_MEAN).view(1, 3, 1, 1)
    assert out.shape == (2, 3, 224, 224)
    assert torch.allclose(undone[:, 1], undone[:, 0], atol=1e-6) and torch.allclose(undone[:, 2], undone[:, 0], atol=1e-6)
    assert torch.equal(M.CUSTOM_DIFFUSION_DINO(rgba), M.CUSTOM_DIFFUSION_DINO(rgba[:, :3]))
    no_resize = M.ImageTransform(crop=(8, 8))
    padded = no_resize(torch.ones(1, 3, 5, 6))
    # HF pads ceil(3/2)=2 rows on top and 1 column on the left
    assert padded.shape == (1, 3, 8, 8) and padded[0, 0, 2:7, 1:7].eq(1).all() and padded.sum() == 3 * 30
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        M.CUSTOM_DIFFUSION_CLIP(torch.rand(1, 2, 8, 8))


@pytest.mark.parametrize("height, width", [(300, 200), (200, 300), (224, 250), (250, 250), (97, 1000)])
def test_output_size_is_hfs_shortest_edge_rule(height, width):
    """transformers' get_resize_output_image_size (shortest edge, aspect kept, the long side truncated)
    is the reference. This test only does arithmetic, so it fails before a wrong size reaches a resize."""
    from transformers.image_transforms import get_resize_output_image_size

    want = get_resize_output_image_size(np.zeros((3, height, width)), size=224, default_to_square=False,
                                        input_data_format="channels_first")
    assert M.ImageTransform(shortest_edge=224).output_size(height, width) == tuple(want)
    assert M.ImageTransform(resize_to=(20, 30)).output_size(height, width) == (20, 30)
    assert M.ImageTransform().output_size(height, width) == (height, width)


@pytest.mark.parametrize("height, width, crop", [(5, 12, (8, 7)), (10, 4, (6, 7)), (9, 11, (4, 6))])
def test_center_crop_equals_hfs_on_3d_and_4d_images(height, width, crop):
    """transformers' center_crop (numpy, channels first) is the reference: one side smaller than the crop
    (odd padding: 3 rows, 3 columns) and the other larger, or both larger."""
    from transformers.image_transforms import center_crop as hf_center_crop

    x = torch.rand(2, 3, height, width) + 0.5
    want = torch.stack([torch.from_numpy(hf_center_crop(i.numpy(), crop, input_data_format="channels_first"))
                        for i in x])
    assert torch.equal(M.center_crop(x, crop), want)
    assert torch.equal(M.center_crop(x[0], crop), want[0])
    if height >= crop[0] and width >= crop[1]:  # nothing to pad: a slice of the batch, as HF's, not a copy
        assert M.center_crop(x, crop).untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_metrics_match_hand_computed_cosines(folders):
    from transformers import CLIPModel, CLIPTokenizer, ViTModel

    clip = M.ClipEncoder.load(str(folders["clip"]))
    dino = M.DinoEncoder.load(str(folders["dino"]))
    generated = torch.rand(3, 3, 64, 64)
    references = torch.rand(2, 3, 96, 80)
    prompts = ["a <tok> dog in the jungle", "a <tok> dog on the beach", "watercolor painting of a <tok> dog"]
    result = M.evaluate(clip, dino, generated, references, prompts, ["<tok>"])

    # independently: the models loaded again, the slow BPE tokenizer from ComfyUI's files, numpy cosines
    clip_model = CLIPModel.from_pretrained(folders["clip"], local_files_only=True).eval()
    vit = ViTModel.from_pretrained(folders["dino"], local_files_only=True, add_pooling_layer=False).eval()
    tokenizer = CLIPTokenizer(str(CLIP_BPE / "vocab.json"), str(CLIP_BPE / "merges.txt"))
    texts = ["a dog in the jungle", "a dog on the beach", "watercolor painting of a dog"]
    with torch.no_grad():
        gi = clip_model.get_image_features(pixel_values=M.CUSTOM_DIFFUSION_CLIP(generated)).numpy()
        ri = clip_model.get_image_features(pixel_values=M.CUSTOM_DIFFUSION_CLIP(references)).numpy()
        te = np.stack([clip_model.get_text_features(**tokenizer(t, return_tensors="pt"))[0].numpy() for t in texts])
        gd = vit(pixel_values=M.CUSTOM_DIFFUSION_DINO(generated)).last_hidden_state[:, 0].numpy()
        rd = vit(pixel_values=M.CUSTOM_DIFFUSION_DINO(references)).last_hidden_state[:, 0].numpy()

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    clip_t_cos = [cos(gi[i], te[i]) for i in range(3)]
    clip_i = [[cos(gi[i], ri[j]) for j in range(2)] for i in range(3)]
    dino_i = [[cos(gd[i], rd[j]) for j in range(2)] for i in range(3)]
    assert result.prompts == texts
    np.testing.assert_allclose(result.clip_t_cosine, clip_t_cos, atol=1e-5)
    np.testing.assert_allclose(result.clip_t, [2.5 * max(c, 0.0) for c in clip_t_cos], atol=1e-5)
    np.testing.assert_allclose(result.clip_i, np.mean(clip_i, axis=1), atol=1e-5)
    np.testing.assert_allclose(result.dino_i, np.mean(dino_i, axis=1), atol=1e-5)
    summary = result.summary()
    assert summary["clip_i"] == pytest.approx(np.mean(clip_i), abs=1e-5)   # the mean over all pairs
    assert summary["dino_i"] == pytest.approx(np.mean(dino_i), abs=1e-5)
    assert summary["clip_t"] == pytest.approx(np.mean([2.5 * max(c, 0.0) for c in clip_t_cos]), abs=1e-5)
    assert len({round(c, 4) for c in clip_t_cos}) == 3  # the random models do tell the inputs apart

    data = json.loads(result.to_json())
    assert data["generated"] == 3 and data["references"] == 2 and data["clip_t_weight"] == 2.5
    assert data["clip_i"] == pytest.approx(summary["clip_i"]) and len(data["images"]) == 3
    lines = result.to_csv().splitlines()
    assert lines[0] == "image,prompt,clip_t,clip_t_cosine,clip_i,dino_i" and lines[-1].startswith("mean,,")
    assert len(lines) == 5


def test_identical_images_align_perfectly_and_batching_does_not_change_results(folders):
    clip = M.ClipEncoder.load(str(folders["clip"]))
    dino = M.DinoEncoder.load(str(folders["dinov2"]))
    images = torch.rand(5, 3, 70, 90)
    whole = M.evaluate(clip, dino, images, images[:1], ["a <t> cat"] * 5, ["<t>"], clip_t_weight=1.0)
    chunked = M.evaluate(clip, dino, images, images[:1], ["a <t> cat"] * 5, ["<t>"], clip_t_weight=1.0,
                         batch_size=2)
    assert whole.clip_i[0] == pytest.approx(1.0, abs=1e-5) and whole.dino_i[0] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(whole.clip_i, chunked.clip_i, atol=1e-5)
    np.testing.assert_allclose(whole.dino_i, chunked.dino_i, atol=1e-5)
    np.testing.assert_allclose(whole.clip_t, np.clip(whole.clip_t_cosine, 0, None), atol=1e-6)


def test_images_of_different_sizes_keep_their_order(folders):
    dino = M.DinoEncoder.load(str(folders["dino"]))
    images = [torch.rand(3, 40, 50), torch.rand(3, 64, 64), torch.rand(3, 40, 50), torch.rand(3, 30, 90)]
    seen = []
    mixed = dino.encode_images(images, batch_size=1, on_batch=seen.append)
    one_by_one = torch.cat([dino.encode_images(image[None]) for image in images])
    assert torch.allclose(mixed, one_by_one, atol=1e-5) and seen == [1, 1, 1, 1]
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)


def test_model_folder_preprocessing_follows_the_folder(folders):
    dino = M.DinoEncoder.load(str(folders["dino"]), preprocessing="model_folder")
    assert dino.transform.resize_to == (224, 224) and dino.transform.resample == "bilinear"
    assert dino.transform.crop is None
    assert M.DinoEncoder.load(str(folders["dino"])).transform == M.CUSTOM_DIFFUSION_DINO


def test_a_vit_dino_loads_without_a_pooler_in_the_asked_dtype(folders, tmp_path):
    """DINO's feature is the CLS token; a ViT's pooler is not in the checkpoint and would be made with random
    weights (transformers warns so), so the encoder is built without it."""
    vit = M.DinoEncoder.load(str(folders["dino"]), dtype=torch.float64)
    assert vit.model.pooler is None and {p.dtype for p in vit.model.parameters()} == {torch.float64}
    broken = tmp_path / "broken"
    shutil.copytree(folders["dino"], broken)
    (broken / "preprocessor_config.json").write_text("[")
    with pytest.raises(M.MetricModelError, match="^" + re.escape(
            f"dino model folder '{broken}': preprocessor_config.json cannot be read: ")):  # + transformers' words
        M.image_transform(str(broken), "dino", "model_folder")


def test_missing_or_wrong_folders_say_what_is_expected(folders, tmp_path):
    with pytest.raises(M.MetricModelError, match=r"clip model folder '.*nowhere' does not exist.*config.json"):
        M.ClipEncoder.load(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(M.MetricModelError) as err:
        M.ClipEncoder.load(str(empty))
    assert "lacks config.json; model.safetensors or pytorch_model.bin; tokenizer.json or vocab.json" in str(err.value)
    with pytest.raises(M.MetricModelError, match="lacks preprocessor_config.json"):
        (empty / "config.json").write_text('{"model_type": "vit"}')
        (empty / "model.safetensors").write_bytes(b"")
        M.DinoEncoder.load(str(empty), preprocessing="model_folder")
    with pytest.raises(M.MetricModelError, match="holds a 'vit' model; it must be .*CLIP.*model_type clip"):
        M.ClipEncoder.load(str(folders["dino"]))
    with pytest.raises(M.MetricModelError, match="holds a 'clip' model.*model_type vit or dinov2"):
        M.DinoEncoder.load(str(folders["clip"]))


def test_dino_folder_messages_in_full(tmp_path):
    """check_model_folder with its default preprocessing; the wording the user reads, by hand."""
    expected = ("it must be a Hugging Face-format DINO (e.g. facebook/dino-vits16) model folder with config.json, "
                "model.safetensors or pytorch_model.bin")
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(M.MetricModelError, match="^" + re.escape(
            f"dino model folder '{tmp_path}' lacks model.safetensors or pytorch_model.bin: {expected}") + "$"):
        M.check_model_folder(str(tmp_path), "dino")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")  # no model_type: an empty one
    with pytest.raises(M.MetricModelError, match="^" + re.escape(
            f"dino model folder '{tmp_path}' holds a '' model; {expected} (config.json model_type vit or dinov2)") + "$"):
        M.check_model_folder(str(tmp_path), "dino")
    (tmp_path / "config.json").write_text("[")
    with pytest.raises(M.MetricModelError) as err:
        M.check_model_folder(str(tmp_path), "dino")
    with pytest.raises(json.JSONDecodeError) as json_err:  # the json module's own words end the message
        json.loads("[")
    assert str(err.value) == f"'{tmp_path / 'config.json'}' is not a readable JSON object: {json_err.value}"


def test_config_json_is_read_as_utf8_whatever_the_locale(tmp_path):
    """HF writes config.json in UTF-8; under a non-UTF-8 locale (here C: ASCII) open()'s default would fail."""
    import codecs
    import locale
    import sys

    if sys.flags.utf8_mode:
        pytest.skip("Python's UTF-8 mode: open() reads UTF-8 whatever the locale")
    (tmp_path / "config.json").write_bytes('{"model_type": "vit", "_name_or_path": "café"}'.encode("utf-8"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        assert codecs.lookup(locale.getencoding()).name == "ascii"  # what open() reads with by default
        M.check_model_folder(str(tmp_path), "dino")
    finally:
        locale.setlocale(locale.LC_CTYPE, old)


def test_bad_inputs(folders):
    clip = M.ClipEncoder.load(str(folders["clip"]))
    dino = M.DinoEncoder.load(str(folders["dino"]))
    with pytest.raises(ValueError, match="2 generated images but 1 prompts"):
        M.evaluate(clip, dino, torch.rand(2, 3, 8, 8), torch.rand(1, 3, 8, 8), ["a"])
    with pytest.raises(ValueError, match="at least one"):
        M.evaluate(clip, dino, torch.rand(1, 3, 8, 8), torch.rand(0, 3, 8, 8), ["a"])


def test_render_table():
    rows = [{"image": "0", "prompt": "a dog " * 20, "clip_t": 0.5}, {"image": "mean", "prompt": "", "clip_t": 0.5}]
    image = M.render_table(rows)
    pixels = np.asarray(image).astype(int)
    assert image.mode == "RGB"
    # the grid (gray 160 lines) splits the image into 3 lines x 3 columns: header, row, mean
    grid = (pixels == 160).all(axis=2)
    ys = [y for y in range(pixels.shape[0]) if grid[y].mean() > 0.9]
    xs = [x for x in range(pixels.shape[1]) if grid[:, x].mean() > 0.9]
    assert len(ys) == 4 and len(xs) == 4, (ys, xs)
    # each cell holds its text as PIL's default font draws it: floats with 4 decimals, a long text
    # cut to 48 characters with an ellipsis; header and last line shaded 230, the others white
    font = ImageFont.load_default()
    want = [["image", "prompt", "clip_t"], ["0", ("a dog " * 20)[:47] + "…", "0.5000"], ["mean", "", "0.5000"]]
    for r, line in enumerate(want):
        shade = (230, 230, 230) if r in (0, 2) else (255, 255, 255)
        for c, text in enumerate(line):
            cell = pixels[ys[r] + 1:ys[r + 1], xs[c] + 1:xs[c + 1]]
            drawn = Image.new("RGB", (cell.shape[1], cell.shape[0]), shade)
            ImageDraw.Draw(drawn).text((6 - 1, 6 - 1), text, fill="black", font=font)  # padding 6, minus the line
            assert np.array_equal(cell, np.asarray(drawn).astype(int)), (r, c, text)


def test_render_table_sizes_cells_to_the_font_and_keeps_48_characters():
    """Each column is its widest text plus 6 px padding on both sides, each line the tallest text plus 2 * 6,
    and one more pixel for the closing grid line; sizes from PIL's own font metrics (getbbox). A text of
    exactly 48 characters is kept whole; a table of one row has its header and that row."""
    font = ImageFont.load_default()
    rows = [{"image": "/data/0.png", "prompt": "m" * 48, "clip_t": 0.25}]  # '/' starts left of x = 0
    want = [["image", "prompt", "clip_t"], ["/data/0.png", "m" * 48, "0.2500"]]
    boxes = [[font.getbbox(text) for text in line] for line in want]
    widths = [max(boxes[r][c][2] - boxes[r][c][0] for r in range(2)) + 12 for c in range(3)]
    height = max(b[3] - b[1] for line in boxes for b in line) + 12
    assert boxes[1][0][0] < 0  # the case where right - left differs from right
    assert M.render_table(rows).size == (sum(widths) + 1, 2 * height + 1)


def test_clip_t_scores_and_input_messages():
    # CLIPScore by hand: cos([1, 0], [1, 1]) = 1 / sqrt(2), cos([0, 1], [0, -1]) = -1 (clipped to 0)
    score, cos = M.clip_t_scores(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, -1.0]]), 2.0)
    assert torch.allclose(cos, torch.tensor([0.5 ** 0.5, -1.0])) and torch.allclose(score, torch.tensor([2 * 0.5 ** 0.5, 0.0]))
    with pytest.raises(ValueError, match=re.escape("2 images but 3 prompts")):
        M.clip_t_scores(torch.rand(2, 5), torch.rand(3, 5))
    with pytest.raises(ValueError, match=re.escape("preprocessing must be one of custom_diffusion, model_folder; got 'x'")):
        M.image_transform("", "clip", "x")


def test_from_hf_processor_reads_every_setting():
    from transformers import CLIPImageProcessor, LayoutLMv2ImageProcessor, Swin2SRImageProcessor

    # Swin2SR's processor has no resize, crop, resample or normalize settings: PIL's bicubic default, rescale only
    assert M.ImageTransform.from_hf_processor(Swin2SRImageProcessor()) == M.ImageTransform(value_scale=1.0)
    # LayoutLMv2's has no rescale setting and gives 0-255 values (HF turns a 200 pixel into 200.0): 224x224 bilinear
    layout = LayoutLMv2ImageProcessor(apply_ocr=False)
    assert np.unique(layout(np.full((20, 30, 3), 200, np.uint8), return_tensors="np")["pixel_values"]).tolist() == [200]
    assert M.ImageTransform.from_hf_processor(layout) == M.ImageTransform(
        resize_to=(224, 224), resample="bilinear", value_scale=255.0)
    plain = M.ImageTransform.from_hf_processor(CLIPImageProcessor(do_rescale=False, do_normalize=False))
    assert plain == M.ImageTransform(shortest_edge=224, crop=(224, 224), value_scale=255.0)
    x = torch.rand(1, 3, 224, 224)
    assert torch.allclose(plain(x), x * 255)  # no rescale: HF's 0-255 pixel values, not normalised
    with pytest.raises(M.MetricModelError, match=re.escape(
            "preprocessor_config.json: size {'longest_edge': 224} is not supported; use preprocessing "
            "'custom_diffusion' or a shortest_edge / height+width size")):
        M.ImageTransform.from_hf_processor(CLIPImageProcessor(size={"longest_edge": 224}))
    with pytest.raises(M.MetricModelError, match=re.escape(
            "preprocessor_config.json: resample 1 is not supported (only 0 nearest, 2 bilinear, 3 bicubic); "
            "use preprocessing 'custom_diffusion'")):
        M.ImageTransform.from_hf_processor(CLIPImageProcessor(resample=1))


def test_model_folder_preprocessing_reads_the_slow_processor_without_a_warning(folders):
    """use_fast=False, as the tests above load the processor: transformers then prints nothing, where an unset
    use_fast prints its "Using a slow image processor as `use_fast` is unset ..." warning to the console."""
    import logging

    records, handler, hf_logger = [], logging.Handler(), logging.getLogger("transformers")
    handler.emit = records.append
    logging.Logger.warning_once.cache_clear()  # transformers prints each warning once per process
    hf_logger.addHandler(handler)
    try:
        transform = M.image_transform(str(folders["clip"]), "clip", "model_folder")
    finally:
        hf_logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    assert transform.shortest_edge == 224


def test_model_folder_preprocessing_of_clip_and_its_messages(folders, tmp_path):
    from transformers import CLIPImageProcessor

    clip = M.ClipEncoder.load(str(folders["clip"]), preprocessing="model_folder", dtype=torch.float64)
    assert clip.dtype == torch.float64
    assert clip.transform == M.ImageTransform.from_hf_processor(CLIPImageProcessor())
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    for f in folders["clip"].iterdir():
        if f.name != "preprocessor_config.json":
            (no_config / f.name).symlink_to(f)
    with pytest.raises(M.MetricModelError, match=re.escape(
            f"dino model folder '{no_config}' lacks preprocessor_config.json, which preprocessing 'model_folder' "
            "reads; add the model's file or use 'custom_diffusion'")):
        M.image_transform(str(no_config), "dino", "model_folder")
    with pytest.raises(M.MetricModelError, match=re.escape(
            f"clip model folder '{no_config}' lacks preprocessor_config.json: it must be a Hugging Face-format CLIP "
            "(e.g. openai/clip-vit-base-patch32) model folder with config.json, model.safetensors or "
            "pytorch_model.bin, tokenizer.json or vocab.json + merges.txt (with tokenizer_config.json), "
            "preprocessor_config.json")):
        M.ClipEncoder.load(str(no_config), preprocessing="model_folder")
    (no_config / "tokenizer_config.json").unlink()
    (no_config / "tokenizer_config.json").write_text("[")  # not JSON: the tokenizer cannot be read
    with pytest.raises(M.MetricModelError, match=re.escape(f"clip model folder '{no_config}' cannot be loaded: ")):
        M.ClipEncoder.load(str(no_config))


@pytest.mark.parametrize("kind, broken", [("clip", "empty weights"), ("dino", "empty weights"),
                                           ("clip", "weights of another size"), ("dino", "weights of another size"),
                                           ("clip", "broken tokenizer.json")])
def test_a_broken_model_folder_is_named(folders, tmp_path, kind, broken):
    """Each break raises something else inside transformers (SafetensorError, RuntimeError, the tokenizers
    library's Exception); the user gets the folder named in every case."""
    folder = tmp_path / kind
    shutil.copytree(folders[kind], folder)
    if broken == "empty weights":
        (folder / "model.safetensors").write_bytes(b"")
    elif broken == "weights of another size":
        config = json.loads((folder / "config.json").read_text())
        section = config["vision_config"] if kind == "clip" else config
        section["hidden_size"] *= 2
        (folder / "config.json").write_text(json.dumps(config))
    else:
        (folder / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    load = M.ClipEncoder.load if kind == "clip" else M.DinoEncoder.load
    with pytest.raises(M.MetricModelError, match="^" + re.escape(f"{kind} model folder '{folder}' cannot be loaded: ")):
        load(str(folder))


def test_evaluate_reports_progress_per_chunk_and_keeps_the_weight(folders):
    clip = M.ClipEncoder.load(str(folders["clip"]))
    dino = M.DinoEncoder.load(str(folders["dino"]))
    torch.manual_seed(0)
    seen = []
    result = M.evaluate(clip, dino, torch.rand(33, 3, 8, 8), torch.rand(1, 3, 8, 8), ["x"] * 33,
                        clip_t_weight=3.0, on_batch=seen.append)
    # default batch size 32: CLIP generated 32 + 1, CLIP references 1, the 33 texts, DINO generated, DINO references
    assert seen == [32, 1, 1, 33, 32, 1, 1]
    assert result.clip_t_weight == 3.0
    np.testing.assert_allclose(result.clip_t, 3.0 * np.clip(result.clip_t_cosine, 0, None), atol=1e-6)
    assert min(result.clip_t_cosine) > 0  # (with this prompt, for the tiny model)
    one = M.evaluate(clip, dino, torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), ["a dog"])
    assert len(one.clip_t) == 1 and one.dino_i[0] == pytest.approx(one.dino_i[0])
    with pytest.raises(ValueError, match="^" + re.escape("need at least one generated and one reference image") + "$"):
        M.evaluate(clip, dino, torch.rand(1, 3, 8, 8), torch.rand(0, 3, 8, 8), ["a"])


def test_results_as_csv_and_json_text():
    result = M.MetricsResult(["a dog"], [0.5], [0.2], [0.75], [0.25], 2, clip_t_weight=2.5)
    # the layout by hand: 6 decimals, "\n" line ends, the mean row last; JSON indented by one space
    assert result.to_csv() == ("image,prompt,clip_t,clip_t_cosine,clip_i,dino_i\n0,a dog,0.500000,0.200000,0.750000,0.250000\n"
                               "mean,,0.500000,0.200000,0.750000,0.250000\n")
    assert M.rows_to_csv([{"a": 1.0, "b": "x"}]) == "a,b\n1.000000,x\n"
    assert result.to_json() == (
        '{\n "clip_t": 0.5,\n "clip_t_cosine": 0.2,\n "clip_i": 0.75,\n "dino_i": 0.25,\n "clip_t_weight": 2.5,\n'
        ' "generated": 1,\n "references": 2,\n "images": [\n  {\n   "image": "0",\n   "prompt": "a dog",\n'
        '   "clip_t": 0.5,\n   "clip_t_cosine": 0.2,\n   "clip_i": 0.75,\n   "dino_i": 0.25\n  }\n ]\n}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Mean of empty slice" warning: an empty result is NaN by itself
        summary = M.MetricsResult([], [], [], [], [], 0).summary()
    assert all(math.isnan(v) for v in summary.values()) and len(summary) == 4
