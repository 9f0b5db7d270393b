"""eqdiff_core.grounding without models: prompts, box selection, mask refinement, file errors."""

import math
import pathlib

import numpy as np
import pytest
import torch

from eqdiff_core import grounding as g


def test_phrases_split_on_dots_and_commas():
    assert g.parse_phrases("Dog. red backpack ,  , a cat.") == ["dog", "red backpack", "a cat"]
    assert g.parse_phrases(" . , ") == []


def test_phrase_index_of_every_token(tmp_path):
    from transformers import BertTokenizerFast

    vocab = [f"[unused{i}]" for i in range(1100)]
    for token, idx in {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}.items():
        vocab[idx] = token
    for i, word in enumerate(["dog", "red", "back", "##pack"]):
        vocab[200 + i] = word
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(tmp_path), local_files_only=True)
    ids, owner = g.tokenize_phrases(tok, g.parse_phrases("Dog, red backpack. dog"))
    assert ids[0].tolist() == [101, 200, 1012, 201, 202, 203, 1012, 200, 1012, 102]
    assert owner.tolist() == [-1, 0, -1, 1, 1, 1, -1, 2, -1, -1]
    # GroundingDINO's text window: max_text_len 256 tokens, [CLS] included, the rest cut
    ids, owner = g.tokenize_phrases(tok, ["dog"] * 200)
    assert ids.shape == (1, 256) and owner.tolist()[-3:] == [126, -1, 127]
    with pytest.raises(g.GroundingError) as empty:
        g.tokenize_phrases(tok, [])
    assert str(empty.value) == ("The prompt names nothing to find: write one or more phrases separated by '.' or "
                                "',', e.g. 'dog . red backpack'.")


def test_box_selection_thresholds_and_pixel_boxes():
    owner = torch.tensor([-1, 0, -1, 1, -1])
    probs = torch.tensor([[0.9, 0.5, 0.99, 0.1, 0.0],    # best phrase token 0.5 ([CLS]/'.' ignored)
                          [0.0, 0.2, 0.0, 0.35, 0.0],
                          [0.0, 0.05, 0.0, 0.1, 0.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    det = g.select_boxes(probs, boxes, owner, 100, 200, 0.3, 0.25, best_only=False)
    assert torch.allclose(det.scores, torch.tensor([0.5, 0.35]))
    assert torch.allclose(det.boxes, torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 0.0, 100.0, 50.0]]))
    assert det.phrases == [[0], [1]]
    assert g.select_boxes(probs, boxes, owner, 100, 200, 0.3, 0.4, False).scores.tolist() == [0.5]
    assert g.select_boxes(probs, boxes, owner, 100, 200, 0.0, 0.0, True).scores.tolist() == [0.5]
    assert g.select_boxes(probs, boxes, owner, 100, 200, 0.6, 0.0, True).boxes.shape == (0, 4)
    # a score equal to a threshold reaches it (0.5 is exact in float32)
    assert g.select_boxes(probs, boxes, owner, 100, 200, 0.5, 0.0, False).scores.tolist() == [0.5]
    tie = g.select_boxes(probs, boxes, owner, 100, 200, 0.0, 0.5, False)
    assert tie.scores.tolist() == [0.5] and tie.phrases == [[0]]


def test_refine_mask_matches_a_max_filter_and_stays_monotone():
    gen = torch.Generator().manual_seed(0)
    small = (torch.rand(2, 20, 30, generator=gen) > 0.9).float()
    big = torch.maximum(small, (torch.rand(2, 20, 30, generator=gen) > 0.8).float())
    grown = g.refine_mask(small, 2)
    ref = np.zeros_like(small.numpy())
    padded = np.pad(small.numpy(), ((0, 0), (2, 2), (2, 2)))
    for y in range(20):
        for x in range(30):
            ref[:, y, x] = padded[:, y:y + 5, x:x + 5].max(axis=(1, 2))
    assert np.array_equal(grown.numpy(), ref)
    assert torch.equal(g.refine_mask(grown, -2) * small, small)  # closing keeps the original pixels
    for d, f in ((0, 0.0), (3, 0.0), (-1, 0.0), (2, 1.5), (0, 4.0)):
        a, b = g.refine_mask(small, d, f), g.refine_mask(big, d, f)
        assert (a <= b + 1e-6).all() and a.min() >= 0 and b.max() <= 1
    assert torch.equal(g.refine_mask(torch.ones(1, 8, 8), -3), torch.ones(1, 8, 8))  # image borders don't erode


def test_refine_mask_defaults_to_no_change_and_grows_by_one_pixel():
    """scipy's 3 x 3 maximum filter (zeros outside the image) for dilate 1; no argument: the mask as it is."""
    from scipy.ndimage import maximum_filter

    mask = (torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(1)) > 0.8).float()
    assert torch.equal(g.refine_mask(mask), mask)
    want = maximum_filter(mask.numpy(), size=(1, 3, 3), mode="constant", cval=0.0)
    assert np.array_equal(g.refine_mask(mask, 1).numpy(), want)


def test_refine_mask_returns_a_mask_in_0_1_whatever_comes_in():
    """Values outside [0, 1] are clipped (numpy). Shrinking counts outside the image as a full mask (1), also
    next to values above 1: scipy's grey erosion with cval 1, then the 3-sigma Gaussian of the test below."""
    from scipy.ndimage import gaussian_filter, grey_erosion

    mask = torch.tensor([-1.0, 0.5, 2.0, 1.5]).repeat(3, 1)[None]
    assert np.array_equal(g.refine_mask(mask).numpy(), np.clip(mask.numpy(), 0, 1))
    mask = torch.zeros(1, 10, 12)
    mask[0, :2] = 1.5
    eroded = grey_erosion(mask[0].double().numpy(), size=3, mode="constant", cval=1.0)
    want = np.clip(gaussian_filter(eroded, 1.0, truncate=3.0, mode="nearest"), 0, 1)
    assert np.allclose(g.refine_mask(mask, -1, 1.0)[0].numpy(), want, atol=1e-6)



def test_overlay_tints_mask_and_outlines_boxes():
    image = torch.zeros(1, 3, 50, 60)
    mask = torch.zeros(1, 50, 60)
    mask[:, 10:20, 10:20] = 1
    det = g.Detection(torch.tensor([[30.0, 5.0, 50.0, 40.0]]), torch.tensor([0.9]), [[0]])
    out = g.overlay(image, mask, [det])
    assert out.shape == image.shape
    assert out[0, 0, 15, 15] > 0.4 and out[0, 1, 5, 40] == 1.0 and out[0, :, 30, 40].sum() == 0


def test_overlay_matches_a_preview_drawn_by_hand():
    """The preview: image * (1 - alpha m) + colour * alpha m, then each box (rounded, clamped to the image)
    outlined inside in green (0.1, 1, 0.1), t = max(1, round(min(h, w) / 200)) px wide, clipped to [0, 1].
    300 x 700: t = round(1.5) = 2; 100 x 160: t = max(1, round(0.5)) = 1. Green slices written by hand."""
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 300, 700, generator=gen)
    image[0, :, 250:260, 20:40], image[1, :, 250:260, 20:40] = -0.5, 1.5  # clipped to 0 and 1
    mask = torch.zeros(2, 300, 700)
    mask[0, 200:260, 300:400], mask[1, 100:120, 300:400] = 1.0, 0.5
    boxes = [[[100.4, 50.0, 199.6, 150.0], [-20.0, -10.0, 720.0, 320.0]],
             [[800.0, 350.0, 900.0, 400.0], [-50.0, 10.0, -5.0, 60.0], [1.0, 200.0, 2.0, 220.0],
              [200.0, 1.0, 220.0, 2.0]]]
    dets = [g.Detection(torch.tensor(b), torch.ones(len(b)), [[0]] * len(b)) for b in boxes]
    a = 0.5 * mask[:, None]
    want = image * (1 - a) + torch.tensor([1.0, 0.2, 0.2]).view(1, 3, 1, 1) * a
    green = torch.tensor([0.1, 1.0, 0.1]).view(3, 1, 1)
    for i, rows, cols in [(0, slice(50, 150), slice(100, 102)), (0, slice(50, 150), slice(198, 200)),  # box 100..200
                          (0, slice(50, 52), slice(100, 200)), (0, slice(148, 150), slice(100, 200)),  # x 50..150
                          (0, slice(0, 300), slice(0, 2)), (0, slice(0, 300), slice(698, 700)),  # box clamped to
                          (0, slice(0, 2), slice(0, 700)), (0, slice(298, 300), slice(0, 700)),  # the whole image
                          (1, slice(299, 300), slice(698, 700)), (1, slice(298, 300), slice(699, 700)),  # past
                          (1, slice(10, 60), slice(0, 2)),  # the corner: 699..700; left of the image: 0..1
                          (1, slice(200, 220), slice(0, 3)),  # 1..2 wide: left edge 1..3, right edge 0..2
                          (1, slice(0, 3), slice(200, 220))]:  # 1..2 high: the same along y
        want[i, :, rows, cols] = green
    out = g.overlay(image, mask, dets)
    assert torch.allclose(out, want.clamp(0, 1), atol=1e-6, rtol=0)
    assert out[0, :, 255, 30].tolist() == [0.0] * 3 and out[1, :, 255, 30].tolist() == [1.0] * 3

    small = torch.full((1, 3, 100, 160), 0.5)
    spot = torch.zeros(1, 100, 160, dtype=torch.bool)
    spot[0, 80:90, 100:120] = True
    boxes = [[10.0, 20.0, 50.0, 60.0], [10.0, -30.0, 50.0, -2.0], [-50.0, 70.0, -5.0, 90.0]]
    out = g.overlay(small, spot, [g.Detection(torch.tensor(boxes), torch.ones(3), [[0]] * 3)],
                    color=(0.0, 0.0, 1.0), alpha=0.25)
    want = small.clone()
    want[0, :, 80:90, 100:120] = torch.tensor([0.375, 0.375, 0.625]).view(3, 1, 1)  # 0.5 * 0.75 + c * 0.25
    for rows, cols in [(slice(20, 60), slice(10, 11)), (slice(20, 60), slice(49, 50)),
                       (slice(20, 21), slice(10, 50)), (slice(59, 60), slice(10, 50)),
                       (slice(0, 1), slice(10, 50)), (slice(70, 90), slice(0, 1))]:  # above / left: 1 px
        want[0, :, rows, cols] = green
    assert torch.allclose(out, want, atol=1e-6, rtol=0)


def test_overlay_keeps_a_float64_image_in_float64():
    """Colour, mask weight and green are taken in the image's dtype: float64 0.1, 0.2 and 0.3 as numpy computes
    them, not their float32 roundings."""
    image = torch.full((1, 3, 20, 20), 0.6, dtype=torch.float64)
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    mask[0, 2:8, 2:8] = True
    det = g.Detection(torch.tensor([[10.0, 10.0, 18.0, 18.0]]), torch.ones(1), [[0]])
    out = g.overlay(image, mask, [det], color=(0.1, 0.2, 0.3), alpha=0.3)
    assert out.dtype == torch.float64
    tint = 0.6 * (1 - np.float64(0.3)) + np.array([0.1, 0.2, 0.3]) * np.float64(0.3)
    assert out[0, :, 5, 5].tolist() == tint.tolist() and out[0, :, 0, 0].tolist() == [0.6] * 3
    assert out[0, :, 12, 10].tolist() == [0.1, 1.0, 0.1]


def test_overlay_is_made_on_the_images_device():
    """Meta stands in for an accelerator: the colour and the mask (here on the CPU) join the image there."""
    image, mask = torch.empty(1, 3, 20, 20, device="meta"), torch.zeros(1, 20, 20, dtype=torch.bool)
    det = g.Detection(torch.tensor([[10.0, 10.0, 18.0, 18.0]]), torch.ones(1), [[0]])
    assert g.overlay(image, mask, [det]).device.type == "meta"


@pytest.mark.cuda
def test_refine_mask_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    mask = torch.zeros(1, 40, 50)
    mask[0, 10:25, 12:30] = 1.0
    out = g.refine_mask(mask.cuda(), 2, 1.5)  # the Gaussian kernel is made on the mask's device
    assert out.device.type == "cuda" and torch.allclose(out.cpu(), g.refine_mask(mask, 2, 1.5), atol=1e-6)


@pytest.mark.cuda
def test_box_selection_takes_the_token_owners_to_the_probabilities_device():
    """PyTorch refuses to index a CPU tensor with a CUDA mask, so owners and probabilities on different
    devices (either way round) fail a selection that does not move the owners; the result is the CPU one."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    owner = torch.tensor([-1, 0, -1, 1, -1])
    probs = torch.tensor([[0.9, 0.5, 0.99, 0.1, 0.0], [0.0, 0.2, 0.0, 0.35, 0.0]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5]])
    on_cpu = g.select_boxes(probs, boxes, owner, 100, 200, 0.3, 0.25, best_only=False)
    mixed = g.select_boxes(probs, boxes, owner.cuda(), 100, 200, 0.3, 0.25, best_only=False)
    assert torch.equal(mixed.boxes, on_cpu.boxes) and torch.equal(mixed.scores, on_cpu.scores)
    assert mixed.phrases == on_cpu.phrases == [[0], [1]]
    on_gpu = g.select_boxes(probs.cuda(), boxes.cuda(), owner, 100, 200, 0.3, 0.25, best_only=False)
    assert torch.equal(on_gpu.boxes.cpu(), on_cpu.boxes) and on_gpu.phrases == [[0], [1]]


@pytest.mark.cuda
def test_a_checkpoint_saved_from_the_gpu_is_read_to_the_cpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.save({"model": {"a": torch.ones(2, device="cuda")}}, tmp_path / "gpu.pth")
    assert g.read_checkpoint(tmp_path / "gpu.pth")["a"].device.type == "cpu"


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(g.GroundingError, match="does not exist"):
        g.read_checkpoint(tmp_path / "missing.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(g.GroundingError, match="no state dict of tensors"):
        g.read_checkpoint(tmp_path / "list.pth")
    for name, content in [("empty.pth", {}), ("numbers.pth", {"a": torch.ones(1), "b": 1})]:
        torch.save(content, tmp_path / name)
        with pytest.raises(g.GroundingError, match=f"^{name} holds no state dict of tensors; it is not a "):
            g.read_checkpoint(tmp_path / name)
    torch.save({"model": {"module.a": torch.ones(2)}}, tmp_path / "ok.pth")
    assert list(g.read_checkpoint(tmp_path / "ok.pth")) == ["a"]
    torch.save({"state_dict": {"module.b": torch.ones(2), "c": torch.zeros(1)}, "epoch": 3}, tmp_path / "lightning.pth")
    assert list(g.read_checkpoint(tmp_path / "lightning.pth")) == ["b", "c"]
    with pytest.raises(g.GroundingError, match="not an original GroundingDINO"):
        g.dino_spec({"a": torch.ones(1)})


def _load_error(path) -> str:
    """What torch.load itself says about the file: the reference for the message's reason."""
    try:
        torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whichever error torch raises is the one to name
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    raise AssertionError(f"torch.load read {path}")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name, head, html", [
    ("login.pth", b"<!DOCTYPE html><html><body>sign in</body></html>", True),
    ("late.pth", b"\x80" * 15 + b"<html>", True),       # '<' at byte 15, the last one looked at
    ("binary.pth", b"\x80" * 16 + b"<html>", False),    # '<' at byte 16: not an HTML page
    ("code.pth", None, False),                          # a pickle that would run code when loaded
])
def test_an_unreadable_checkpoint_is_named_with_torchs_reason_and_what_to_do(tmp_path, name, head, html):
    """The message names the file, quotes the first line (at most 200 characters) of torch.load's own
    error, and hints at a saved web page only when a '<' is among the first 16 bytes. A file that holds
    anything but tensors and plain containers is refused unread (weights_only), not run."""
    path = tmp_path / name
    if head is None:
        torch.save({"a": torch.ones(1), "where": pathlib.PurePosixPath("x")}, path)
    else:
        path.write_bytes(head + bytes(range(256)))
    hint = " It looks like an HTML page, not weights: download the file again." if html else ""
    reason = _load_error(path)
    want = (f"{name} cannot be read as weights ({reason}). The file is damaged, incomplete or not a "
            f"checkpoint.{hint} Replace it with the original .pth (loaded with torch.load(weights_only=True)) "
            "or a .safetensors copy.")
    with pytest.raises(g.GroundingError) as info:
        g.read_checkpoint(path)
    assert str(info.value) == want
    # torch's first line about the HTML page runs past 200 characters: there the cut is checked
    assert name != "login.pth" or len(reason.split(": ", 1)[1]) == 200


def test_detect_size_grows_until_there_are_enough_tokens_for_the_queries():
    assert g.fit_detect_size(800, 512, 512, 900) == 800
    size = g.fit_detect_size(128, 512, 512, 900)  # 128 px gives 340 tokens, fewer than 900 queries
    def tokens(n):
        return sum(math.ceil(n / s) ** 2 for s in (8, 16, 32, 64))

    assert size > 128 and tokens(size) >= 900 > tokens(size - 32)
    assert g.fit_detect_size(128, 100, 2000, 10**9) <= 128 + 32 * 100  # stops at the 1333 px cap


def test_detect_size_stops_growing_at_the_1333_px_cap():
    """A 600 x 1000 image reaches the long-side cap when size * 1000 / 600 >= 1333, at 799.8 px:
    from 128 in steps of 32 that is 800 (128 + 21 * 32), however many queries are asked for."""
    assert g.fit_detect_size(128, 600, 1000, 10**9) == 800
    assert g.fit_detect_size(128, 1000, 600, 10**9) == 800
    # 500 x 1000 with max_size 640: 2 * 320 = 640 is not past the cap, 2 * 352 = 704 is: 352
    assert g.fit_detect_size(128, 500, 1000, 10**9, max_size=640) == 352


def test_detect_size_counts_tokens_at_the_four_strides_rounding_up():
    """Tokens at shape (h, w): sum over s in 8, 16, 32, 64 of ceil(h / s) * ceil(w / s), by hand.
    512 x 512 at 224: 28*28 + 14*14 + 7*7 + 4*4 = 1045 (3.5 -> 4); 128, 160, 192 give fewer; 256 is next.
    600 x 1000 at 128 is 128 x 213: 16*27 + 8*14 + 4*7 + 2*4 = 580; at 160, 160 x 266: 20*34 + 10*17
    + 5*9 + 3*5 = 910. 500 x 1008 at 128 is 128 x 258, a side just past 8 * 32 and 4 * 64 (so a wrong
    stride there counts fewer tokens): 16*33 + 8*17 + 4*9 + 2*5 = 710."""
    assert g.fit_detect_size(128, 512, 512, 1045) == 224 and g.fit_detect_size(128, 512, 512, 1046) == 256
    assert g.fit_detect_size(128, 600, 1000, 580) == 128 and g.fit_detect_size(128, 600, 1000, 581) == 160
    assert g.fit_detect_size(128, 600, 1000, 910) == 160 and g.fit_detect_size(128, 600, 1000, 911) == 192
    assert g.fit_detect_size(128, 1000, 600, 910) == 160 and g.fit_detect_size(128, 1000, 600, 911) == 192
    assert g.fit_detect_size(128, 500, 1008, 710) == 128 and g.fit_detect_size(128, 500, 1008, 711) == 160


# -- input preparation, box scaling and mask assembly against the original libraries ------------------
def photo(h, w, seed=0, sharp=False):
    """A smooth uint8 photo (H, W, 3), so 8-bit resizing differs from float resizing by rounding only;
    ``sharp``: noise at every pixel, where shrinking without antialiasing (PIL always filters) shows."""
    gen = torch.Generator().manual_seed(seed)
    if sharp:
        return (torch.rand(h, w, 3, generator=gen) * 255).round().to(torch.uint8).numpy()
    coarse = torch.rand(1, 3, 6, 6, generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    return (smooth.clamp(0, 1)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


@pytest.mark.parametrize("h, w, size, max_size, sharp", [
    (96, 128, 128, 1333, False), (480, 640, 800, 1333, False), (100, 2000, 800, 1333, False),
    (333, 250, 160, 1333, True),
    (500, 1000, 800, 1333, False),  # capped: round(1333 / 2) = 666 (Python rounds half to even), 1334 gives 667
    (300, 900, 200, 450, False),    # another cap: 3 * 200 > 450, so 150 x 450
])
def test_detection_input_is_groundingdinos_transform(h, w, size, max_size, sharp):
    """Grounded-SAM prepares an image with GroundingDINO's own transforms: RandomResize([size],
    max_size=1333) (shorter side ``size``, longer side at most 1333), ToTensor, ImageNet Normalize."""
    import groundingdino.datasets.transforms as T
    from PIL import Image

    pixels = photo(h, w, sharp=sharp)
    original = T.Compose([T.RandomResize([size], max_size=max_size), T.ToTensor(),
                          T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    want, _ = original(Image.fromarray(pixels), None)
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    ours = (g.dino_inputs(image, size) if max_size == 1333 else g.dino_inputs(image, size, max_size))[0]
    assert ours.shape == want.shape
    diff = (ours - want).abs()
    assert diff.max() < 3.0 / 255 / 0.224 and diff.mean() < 0.5 / 255 / 0.224  # PIL's 8-bit rounding


@pytest.mark.parametrize("h, w, size, sharp", [(96, 128, 1024, False), (100, 130, 1024, False),
                                              (300, 177, 1024, False), (300, 177, 256, True)])
def test_segmentation_input_boxes_and_masks_are_sams(h, w, size, sharp):
    """SAM's predictor: ResizeLongestSide(size) for the image and the boxes, Sam.preprocess
    (normalise, pad right and bottom to the encoder's size), Sam.postprocess_masks then logits > 0
    (mask_threshold 0.0) for the masks. 256: an encoder of another size, and a shrinking resize."""
    from types import SimpleNamespace

    from segment_anything.modeling import Sam
    from segment_anything.utils.transforms import ResizeLongestSide

    pixels = photo(h, w, seed=1, sharp=sharp)
    resize = ResizeLongestSide(size)
    sam = SimpleNamespace(pixel_mean=torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1),
                          pixel_std=torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1),
                          image_encoder=SimpleNamespace(img_size=size))
    resized = torch.from_numpy(resize.apply_image(pixels)).permute(2, 0, 1).float()
    want = Sam.preprocess(sam, resized)
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    ours = g.sam_inputs(image) if size == 1024 else g.sam_inputs(image, size)
    assert ours.shape == (1, 3, size, size)
    inside = (slice(None), slice(0, resized.shape[1]), slice(0, resized.shape[2]))
    diff = (ours[0] - want)[inside].abs()
    assert diff.max() < 3.0 / 57.12 and diff.mean() < 0.5 / 57.12  # PIL's 8-bit rounding, in SAM's std units
    assert torch.equal(ours[0, :, resized.shape[1]:], want[:, resized.shape[1]:])  # the padding
    assert torch.equal(ours[0, :, :, resized.shape[2]:], want[:, :, resized.shape[2]:])
    boxes = torch.tensor([[3.0, 5.0, w - 7.0, h - 2.0], [0.0, 0.0, w / 2, h / 3]])
    def sam_boxes(b):
        return g.sam_boxes(b, h, w) if size == 1024 else g.sam_boxes(b, h, w, size)

    def masks_to_image(low):
        return g.masks_to_image(low, h, w) if size == 1024 else g.masks_to_image(low, h, w, size)

    assert torch.allclose(sam_boxes(boxes), resize.apply_boxes_torch(boxes, (h, w)))
    # SAM's factors new / old per axis, kept in the boxes' own precision (its apply_boxes_torch casts to float32)
    nh, nw = resize.get_preprocess_shape(h, w, size)
    factors = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=torch.float64)
    assert torch.equal(sam_boxes(boxes.double()), boxes.double() * factors)
    assert sam_boxes(boxes.half()).dtype == torch.float16
    logits = torch.randn(2, 1, 256, 256, generator=torch.Generator().manual_seed(2))
    reference = Sam.postprocess_masks(sam, logits, (nh, nw), (h, w))[:, 0] > 0.0
    assert torch.equal(masks_to_image(logits[:, 0]), reference)
    assert not masks_to_image(torch.zeros(1, 256, 256)).any(), "a logit of exactly 0 is not above the threshold"


def test_detection_and_segmentation_inputs_stay_on_the_images_device():
    """Meta stands in for an accelerator: the means, stds and box factors are made where the data is."""
    image = torch.empty(1, 3, 96, 128, device="meta")
    assert g.dino_inputs(image, 128).device.type == "meta" and g.sam_inputs(image, 64).device.type == "meta"
    assert g.sam_boxes(torch.empty(2, 4, device="meta"), 96, 128).device.type == "meta"


def test_pixel_boxes_are_clamped_to_the_image():
    """Box edges outside the image are moved onto its border (SAM is given boxes inside the image).
    200 x 100 image: (0.9, 0.95, 0.4, 0.3) spans x 140..220, y 80..110 -> 140..200, 80..100;
    (0.1, 0.05, 0.4, 0.3) spans x -20..60, y -10..20 -> 0..60, 0..20; a box of 0.3 px stays 0.3 px."""
    boxes = torch.tensor([[0.9, 0.95, 0.4, 0.3], [0.1, 0.05, 0.4, 0.3], [0.001, 0.002, 0.001, 0.002]])
    probs = torch.tensor([[0.0, 0.9, 0.0]] * 3)
    det = g.select_boxes(probs, boxes, torch.tensor([-1, 0, -1]), 100, 200, 0.3, 0.25, best_only=False)
    want = torch.tensor([[140.0, 80.0, 200.0, 100.0], [0.0, 0.0, 60.0, 20.0], [0.1, 0.1, 0.3, 0.3]])
    assert torch.allclose(det.boxes, want, atol=1e-4)


def test_pixel_boxes_are_groundingdinos_cxcywh_to_xyxy_scaled():
    """Grounded-SAM: boxes * [W, H, W, H], centre-size to corners (groundingdino.util.box_ops)."""
    from groundingdino.util.box_ops import box_cxcywh_to_xyxy

    boxes = torch.tensor([[0.5, 0.4, 0.2, 0.3], [0.3, 0.6, 0.4, 0.5], [0.7, 0.2, 0.1, 0.2]])
    probs = torch.tensor([[0.0, 0.9, 0.0], [0.0, 0.8, 0.0], [0.0, 0.7, 0.0]])
    det = g.select_boxes(probs, boxes, torch.tensor([-1, 0, -1]), 90, 160, 0.3, 0.25, best_only=False)
    assert torch.allclose(det.boxes, box_cxcywh_to_xyxy(boxes) * torch.tensor([160, 90, 160, 90]))


def test_feather_is_a_gaussian_of_sigma_feather():
    """scipy.ndimage.gaussian_filter with the same truncation (3 sigma) and replicated borders."""
    from scipy.ndimage import gaussian_filter

    mask = torch.zeros(1, 40, 50)
    mask[0, 10:25, 12:30] = 1.0
    mask[0, 0, 45] = 1.0  # at the border
    mask[0, 30:36, 49] = 1.0  # at the right edge
    for sigma in (1.0, 2.0, 3.5):
        want = gaussian_filter(mask[0].double().numpy(), sigma, truncate=3.0, mode="nearest")
        assert np.allclose(g.refine_mask(mask, 0, sigma)[0].numpy(), want, atol=1e-6), sigma
