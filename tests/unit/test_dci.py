"""DCI (eqdiff_core/dci.py) against a reference written here, in numpy, line by line from the authors' code
(jinjianRick/DCI_ICO @ 653b97b: src/model.py 171-249 for DBIM, ldm/models/diffusion/ddim.py 213-320 for
the step), as /work/shared/notes/related-methods.md 2.3.3 transcribes it."""

import re

import numpy as np
import pytest
import torch

from eqdiff_core import dci


def _softmax(a, axis):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def reference_dbim(attn, out, heads, length_custom, mask_custom, length_ldm, mask_ldm, lam):
    """The code's new_forward tail with share_guidance: attn (3*b*h, n, 77) rows [uncond, concept, aux] in
    '(b h)' order, out (3*b, n, h*d); returns the new out."""
    b3 = out.shape[0]
    third = b3 // 3
    # rearrange '(b h) n d -> b n (h d)' then split along b, then back: the split is on blocks of b*h rows
    attn_cond1 = attn[third * heads:2 * third * heads]
    attn_cond2 = attn[2 * third * heads:]
    attn_cond1 = _softmax(10 * attn_cond1[:, :, 1:1 + length_custom], -1)
    attn_cond2 = _softmax(10 * attn_cond2[:, :, 1:1 + length_ldm], -1)
    attn1 = sum(attn_cond1[:, :, i] for i in mask_custom)
    attn2 = attn_cond2.sum(axis=2) - sum(attn_cond2[:, :, i] for i in mask_ldm)
    attn1 = 500 * _softmax(10 * attn1, -1)
    attn2 = 500 * _softmax(10 * attn2, -1)
    w = _softmax(np.stack([attn1, lam * attn2]), 0)
    n, hd = out.shape[1], out.shape[2]
    d = hd // heads

    def split_heads(t):  # 'b n (h d) -> (b h) n d'
        return t.reshape(t.shape[0], n, heads, d).transpose(0, 2, 1, 3).reshape(-1, n, d)

    out1 = split_heads(out[third:2 * third])
    out2 = split_heads(out[2 * third:])
    mixed = w[0][..., None] * out1 + w[1][..., None] * out2
    mixed = mixed.reshape(third, heads, n, d).transpose(0, 2, 1, 3).reshape(third, n, hd)
    return np.concatenate([out[:third], mixed, out[2 * third:]]), w


def fixed_batch(seed=0, batch=1, heads=2, n=256, tokens=77, d=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3 * batch * heads, n, tokens)) * 3
    attn = _softmax(logits, -1)
    out = rng.normal(size=(3 * batch, n, heads * d))
    return attn, out


@pytest.mark.parametrize("lam", [-2.0, -0.5, 0.0, 1.0, 2.0])
@pytest.mark.parametrize("batch", [1, 2])
def test_dbim_matches_the_authors_code(lam, batch):
    heads, length_c, mask_c, length_a, mask_a = 2, 7, [2, 3], 6, [2]
    attn, out = fixed_batch(seed=int(lam * 10) + 20 + batch, batch=batch, heads=heads)
    expected, w_expected = reference_dbim(attn, out, heads, length_c, mask_c, length_a, mask_a, lam)
    rows = batch * heads
    probs_c = torch.from_numpy(attn[rows:2 * rows])
    probs_a = torch.from_numpy(attn[2 * rows:])
    w_c, w_a = dci.integration_weights(probs_c, probs_a, mask_c, length_c, mask_a, length_a, lam)
    np.testing.assert_allclose(w_c.numpy(), w_expected[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(w_a.numpy(), w_expected[1], rtol=1e-6, atol=1e-9)
    n, d = out.shape[1], out.shape[2] // heads
    split = lambda t: torch.from_numpy(t).reshape(batch, n, heads, d).permute(0, 2, 1, 3).reshape(-1, n, d)  # noqa: E731
    mixed = dci.integrate(split(out[batch:2 * batch]), split(out[2 * batch:]), w_c, w_a)
    mixed = mixed.reshape(batch, heads, n, d).permute(0, 2, 1, 3).reshape(batch, n, heads * d)
    np.testing.assert_allclose(mixed.numpy(), expected[batch:2 * batch], rtol=1e-6, atol=1e-9)


def test_branch_map_at_the_edges_of_the_prompt():
    """Eq. 3 with the code's re-softmax, in numpy: a context of T = 6 tokens (BOS + at most 5 real ones) over
    N = 3 pixels. Column 0 (the first word) and the last real column count; the complement sums every other
    real token; half-precision maps are computed in float32."""
    probs = _softmax(np.random.default_rng(4).normal(size=(1, 3, 6)), -1)
    t = torch.from_numpy(probs)
    for length, cols in ((5, [0, 4]), (1, [0]), (3, [1])):
        a = _softmax(10 * probs[:, :, 1:1 + length], -1)
        others = [i for i in range(length) if i not in cols]
        np.testing.assert_allclose(dci.branch_map(t, length, cols).numpy(), a[:, :, cols].sum(-1), rtol=1e-12)
        np.testing.assert_allclose(dci.branch_map(t, length, cols, complement=True).numpy(),
                                   a[:, :, others].sum(-1), rtol=1e-12, atol=1e-15)
    half = dci.branch_map(t.half(), 5, [0, 4])
    a = _softmax(10 * probs.astype(np.float16).astype(np.float64)[:, :, 1:6], -1)
    assert half.dtype == torch.float32
    np.testing.assert_allclose(half.numpy(), a[:, :, [0, 4]].sum(-1), rtol=1e-5)
    for length in (0, 6):
        with pytest.raises(ValueError, match="^" + re.escape(
                f"prompt length {length} does not fit a context of 6 tokens") + "$"):
            dci.branch_map(t, length, [0])
    for cols in ([5], [-1]):
        with pytest.raises(ValueError, match="^" + re.escape(
                f"token columns {cols} are outside the prompt's 5 real tokens") + "$"):
            dci.branch_map(t, 5, cols)


def test_integrate_keeps_the_outputs_dtype():
    """By hand: w_c F_c + w_a F_a with float32 weights over half-precision outputs stays half precision."""
    w_c, w_a = torch.tensor([[0.25, 1.0]]), torch.tensor([[0.75, 0.0]])
    out_c, out_a = torch.full((1, 2, 3), 2.0, dtype=torch.float16), torch.full((1, 2, 3), 4.0, dtype=torch.float16)
    mixed = dci.integrate(out_c, out_a, w_c, w_a)
    assert mixed.dtype == torch.float16
    assert torch.equal(mixed, torch.tensor([[[3.5] * 3, [2.0] * 3]], dtype=torch.float16))  # 0.5 + 3, 2 + 0


def _blob_probs(side, inside_concept, rng):
    """Synthetic maps as in the notes' check: 5 real tokens, concept tokens at columns 1, 2 dominate inside a
    centred square, the context tokens (0, 3, 4) outside it; (1, N, 77) probabilities."""
    n = side * side
    yy, xx = np.mgrid[:side, :side]
    inside = (abs(yy - side / 2 + 0.5) < side / 4) & (abs(xx - side / 2 + 0.5) < side / 4)
    logits = rng.normal(size=(1, n, 77)) * 0.1 - 4.0
    for col in (1, 2) if inside_concept else (1,):
        logits[0, inside.ravel(), 1 + col] += 6.0
    for col in (0, 3, 4):
        logits[0, ~inside.ravel(), 1 + col] += 6.0
    return torch.from_numpy(_softmax(logits, -1)), inside.ravel()


def test_lambda_zero_still_injects_about_half_in_the_background():
    """The notes' numeric check (2.3.4): at 16x16, lambda 0 leaves w_a near 0.5 outside the subject (0.49 in
    the notes), far less inside; the background weight grows with lambda."""
    rng = np.random.default_rng(3)
    probs_c, inside = _blob_probs(16, True, rng)
    probs_a, _ = _blob_probs(16, False, rng)
    background = {}
    for lam in (-2.0, 0.0, 1.0, 2.0):
        _, w_a = dci.integration_weights(probs_c, probs_a, [1, 2], 5, [1], 5, lam)
        background[lam] = float(w_a[0, ~torch.from_numpy(inside)].mean())
        if lam == 0.0:
            assert 0.4 < background[lam] < 0.5
            assert float(w_a[0, torch.from_numpy(inside)].mean()) < 0.1
    assert background[-2.0] < background[0.0] < background[1.0] < background[2.0]


def test_branch_probabilities_must_be_three_dimensional_and_aligned():
    probs = torch.softmax(torch.randn(2, 16, 77), -1)
    for a, b in ((probs[0], probs[0]), (probs, probs[:, :8]), (probs, probs[:1]), (probs[None], probs[None]),
                 (probs[..., None], probs), (probs, probs[..., None])):
        with pytest.raises(ValueError, match="^" + re.escape(
                f"attention probabilities must be (BH, N, T) for both branches, got {tuple(a.shape)} and "
                f"{tuple(b.shape)}") + "$"):
            dci.integration_weights(a, b, [1], 5, [1], 5, 0.0)
    w_c, w_a = dci.integration_weights(probs, probs[:, :, :70], [1], 5, [1], 5, 0.0)  # contexts may differ
    assert w_c.shape == w_a.shape == (2, 16)


def test_only_minus_infinity_is_neutral():
    """w_a = sigmoid(lambda S_a - S_c) > 0 for every finite lambda (float64, 256 pixels: nothing underflows);
    -inf gives w_a = 0 and DBIM returns the
    concept branch's output bit for bit."""
    attn, out = fixed_batch(seed=5)
    probs_c, probs_a = torch.from_numpy(attn[2:4]), torch.from_numpy(attn[4:])
    _, w_a = dci.integration_weights(probs_c, probs_a, [2], 5, [2], 5, -2.0)
    assert float(w_a.min()) > 0
    w_c, w_a = dci.integration_weights(probs_c, probs_a, [2], 5, [2], 5, float("-inf"))
    assert torch.equal(w_a, torch.zeros_like(w_a)) and torch.equal(w_c, torch.ones_like(w_c))
    out_c, out_a = torch.randn(2, 256, 4), torch.randn(2, 256, 4)
    assert torch.equal(dci.integrate(out_c, out_a, w_c, w_a), out_c)


def test_dci_step_matches_the_authors_ddim():
    """ComfyUI's x = x_vp / sqrt(a); the code's step in VP space (eta 0): pred_x0 = (x - sqrt(1-a) e) /
    sqrt(a), x_prev = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev) e, with shared CFG for the auxiliary branch."""
    rng = np.random.default_rng(7)
    a, a_prev, scale = 0.05, 0.12, 6.0
    x_vp, x_vp_aux = rng.normal(size=(2, 1, 4, 8, 8))
    e_u, e_c, e_a, e_ua = rng.normal(size=(4, 1, 4, 8, 8))

    def code_step(x, e_t):
        pred_x0 = (x - np.sqrt(1 - a) * e_t) / np.sqrt(a)
        return np.sqrt(a_prev) * pred_x0 + np.sqrt(1 - a_prev) * e_t

    sigma, sigma_next = np.sqrt((1 - a) / a), np.sqrt((1 - a_prev) / a_prev)
    t = lambda v: torch.from_numpy(v)  # noqa: E731
    for separate in (False, True):
        e_t = e_u + scale * (e_c - e_u)
        e_ldm = (e_ua if separate else e_u) + scale * (e_a - (e_ua if separate else e_u))
        x_c, x_a = dci.dci_step(t(x_vp / np.sqrt(a)), t(x_vp_aux / np.sqrt(a)), t(e_u), t(e_c), t(e_a), sigma,
                                sigma_next, scale, t(e_ua) if separate else None)
        np.testing.assert_allclose(x_c.numpy() * np.sqrt(a_prev), code_step(x_vp, e_t), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(x_a.numpy() * np.sqrt(a_prev), code_step(x_vp_aux, e_ldm), rtol=1e-9, atol=1e-9)


def test_auxiliary_denoised_is_the_guided_x0_of_the_code():
    """By hand (numpy), from the code's p_sample_ddim: the branch's own noise eps_aux = (x_a - x0_aux) / sigma,
    guided e_a = e_u + s (eps_aux - e_u), and its x_0 = x_a - sigma e_a (sigma, scale not 1: * and / differ)."""
    rng = np.random.default_rng(3)
    x_a, x0_aux, e_u = rng.normal(size=(3, 1, 4, 8, 8))
    sigma, scale = 2.5, 6.0
    e_a = e_u + scale * ((x_a - x0_aux) / sigma - e_u)
    got = dci.auxiliary_denoised(torch.from_numpy(x_a), torch.from_numpy(x0_aux), torch.from_numpy(e_u), sigma, scale)
    np.testing.assert_allclose(got.numpy(), x_a - sigma * e_a, rtol=1e-12, atol=1e-12)


def test_window_follows_the_code():
    """``step / 1000 > 1 - agg_time``: with 50 DDIM steps (981, 961, ...) and 0.3, timesteps 981 ... 701."""
    steps = [i * 20 + 1 for i in reversed(range(50))]
    assert [s for s in steps if dci.in_window(s, 0.3)] == [981 - 20 * i for i in range(15)]
    assert not any(dci.in_window(s, 0.0) for s in range(1000))
    assert all(dci.in_window(s, 1.0) for s in range(1, 1000))
    assert not dci.in_window(500, 0.5) and dci.in_window(501, 0.5)  # strictly past: 500 / 1000 > 0.5 is false


def test_concept_phrase_and_auxiliary_prompt():
    assert dci.concept_phrase("a photo of <my-dog> dog in Times Square") == "<my-dog> dog"
    assert dci.concept_phrase("a <x> in a park", class_word="dog") == "<x>"
    assert dci.concept_phrase("embedding:skull skull mug on a desk") == "embedding:skull skull"
    assert dci.concept_phrase("a sks dog on the moon", concept_words=" sks  dog") == "sks dog"
    assert dci.auxiliary_prompt("a (<d> dog:1.2) and a <d> dog", "<d> dog", "cat") == "a (cat:1.2) and a cat"
    assert dci.default_aux_noun("<c> cat") == "dog"
    with pytest.raises(ValueError, match="concept_words"):
        dci.concept_phrase("a dog", concept_words="sks dog")
    with pytest.raises(ValueError, match="no concept token"):
        dci.concept_phrase("a dog on the beach")
    with pytest.raises(ValueError, match="aux_noun"):
        dci.auxiliary_prompt("a <d> dog", "<d> dog", "red car")


def test_concept_phrase_ignores_case_and_keeps_a_matching_class_word():
    assert dci.concept_phrase("a <x> Dog in a park", class_word="dog") == "<x> Dog"  # the class word, any case
    assert dci.concept_phrase("a <x> dog in a park", class_word="DOG") == "<x> dog"
    assert dci.concept_phrase("a SKS Dog on the moon", concept_words="sks dog") == "sks dog"
    assert dci.auxiliary_prompt("a SKS Dog and a sks dog", "sks dog", "cat") == "a cat and a cat"
    want = ("concept_words: 'sks dog' is not in the prompt 'a dog'; write the subject's words as they appear in it, "
            "or leave it empty to find the concept token")
    with pytest.raises(ValueError, match="^" + re.escape(want) + "$"):
        dci.concept_phrase("a dog", concept_words="sks   dog")


def test_token_columns():
    e = torch.ones(3)
    prompt = [320, 1125, e, 1929, 530, e, 1929]        # a photo <e> dog and <e> dog
    aux = [320, 1125, 2368, 530, 2368]                 # a photo cat and cat
    concept, noun = dci.token_columns(prompt, [e, 1929], aux, [2368])
    assert concept == [2, 3, 5, 6] and noun == [2, 4]
    with pytest.raises(ValueError, match="^" + re.escape(
            "the concept phrase's tokens are not in the prompt's tokens (is the prompt longer than 75 tokens?)") + "$"):
        dci.token_columns([320], [e], [320], [2368])


def test_token_columns_of_a_two_token_noun_and_misaligned_auxiliary_prompts():
    """By hand: P = a <e> dog and <e> dog, P_a = a teddy bear and teddy bear (noun 2 tokens, shift 0):
    noun columns 1, 2 and 4, 5. An auxiliary row that is one token short, or that holds other tokens at
    those columns (in the first or the second occurrence), is refused with the same message."""
    e = torch.ones(3)
    prompt, phrase, noun = [320, e, 1929, 530, e, 1929], [e, 1929], [7, 8]
    assert dci.token_columns(prompt, phrase, [320, 7, 8, 530, 7, 8], noun) == ([1, 2, 4, 5], [1, 2, 4, 5])
    misaligned = "^" + re.escape("the auxiliary prompt's tokens do not line up with the prompt's; put spaces around "
                                 "the concept words") + "$"
    for aux in ([320, 7, 8, 530, 7], [320, 8, 7, 530, 7, 8], [320, 7, 8, 530, 8, 7]):
        with pytest.raises(ValueError, match=misaligned):
            dci.token_columns(prompt, phrase, aux, noun)


def test_span_positions_from_the_first_token_and_tensors_never_equal_ids():
    e = torch.ones(3)
    assert dci.span_positions([5, 6, 5, 5], [5]) == [0, 2, 3] and dci.span_positions([5, 6, 5, 6], [5, 6]) == [0, 2]
    assert dci.span_positions([e, 1], [1]) == [1] and dci.span_positions([1, e], [e]) == [1]  # embedding vs id
    assert dci.span_positions([torch.tensor(7)], [7]) == [] and dci.span_positions([7], [torch.tensor(7)]) == []
