"""eqdiff_core.grounding without models: prompts, box selection, mask refinement, file errors."""

import math

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
    ids, owner = g.tokenize_phrases(tok, g.parse_phrases("Dog, red backpack"))
    assert ids[0].tolist() == [101, 200, 1012, 201, 202, 203, 1012, 102]
    assert owner.tolist() == [-1, 0, -1, 1, 1, 1, -1, -1]
    with pytest.raises(g.GroundingError, match="prompt"):
        g.tokenize_phrases(tok, [])


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


def test_overlay_tints_mask_and_outlines_boxes():
    image = torch.zeros(1, 3, 50, 60)
    mask = torch.zeros(1, 50, 60)
    mask[:, 10:20, 10:20] = 1
    det = g.Detection(torch.tensor([[30.0, 5.0, 50.0, 40.0]]), torch.tensor([0.9]), [[0]])
    out = g.overlay(image, mask, [det])
    assert out.shape == image.shape
    assert out[0, 0, 15, 15] > 0.4 and out[0, 1, 5, 40] == 1.0 and out[0, :, 30, 40].sum() == 0


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(g.GroundingError, match="does not exist"):
        g.read_checkpoint(tmp_path / "missing.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(g.GroundingError, match="no state dict of tensors"):
        g.read_checkpoint(tmp_path / "list.pth")
    torch.save({"model": {"module.a": torch.ones(2)}}, tmp_path / "ok.pth")
    assert list(g.read_checkpoint(tmp_path / "ok.pth")) == ["a"]
    with pytest.raises(g.GroundingError, match="not an original GroundingDINO"):
        g.dino_spec({"a": torch.ones(1)})


def test_detect_size_grows_until_there_are_enough_tokens_for_the_queries():
    assert g.fit_detect_size(800, 512, 512, 900) == 800
    size = g.fit_detect_size(128, 512, 512, 900)  # 128 px gives 340 tokens, fewer than 900 queries
    def tokens(n):
        return sum(math.ceil(n / s) ** 2 for s in (8, 16, 32, 64))

    assert size > 128 and tokens(size) >= 900 > tokens(size - 32)
    assert g.fit_detect_size(128, 100, 2000, 10**9) <= 128 + 32 * 100  # stops at the 1333 px cap
