"""eqdiff_core.training against hand-written formulas: FDTE draw, MGDP (Eq. 6-7), augmentation, settings."""

import math
import re

import pytest
import torch

from eqdiff_core import training


def test_branch_draw_follows_the_probabilities():
    g = torch.Generator().manual_seed(0)
    for probs in [(0.1, 0.1, 0.8), (0.3, 0.3, 0.6), (0.0, 1.0, 0.0)]:
        draws = training.draw_branches(200_000, probs, g)
        freq = torch.bincount(draws, minlength=3).double() / draws.numel()
        want = torch.tensor(probs, dtype=torch.float64) / sum(probs)
        assert torch.allclose(freq, want, atol=4e-3), (probs, freq)
    assert training.draw_branches(0, (0.1, 0.1, 0.8), g).numel() == 0
    assert training.draw_branches(0, (0.1, 0.1, 0.8), g).dtype == torch.long  # an index tensor even when empty
    # only the ratio counts: weights far beyond float32's range still mean "always LOW" (branch 0)
    assert torch.equal(training.draw_branches(5, (1e300, 0.0, 0.0), g), torch.zeros(5, dtype=torch.long))


def test_branch_embeddings_are_lf_hf_and_their_sum():
    lf, hf = torch.randn(8), torch.randn(8)
    out = training.branch_embeddings(lf, hf, torch.tensor([training.LOW, training.HIGH, training.ORIGINAL, training.LOW]))
    assert torch.equal(out[0], lf) and torch.equal(out[1], hf) and torch.equal(out[3], lf)
    assert torch.allclose(out[2], lf + hf)


def test_frequency_bands_use_the_settings_filter_profile():
    """The cutoffs are bins on a 512 grid (50 and 5 bins = 50/256 and 5/256 of Nyquist) and the
    profile is the settings' own, not frequency_split's default (ideal)."""
    from eqdiff_core import frequency

    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    s = training.settings_for("paper", filter_profile="gaussian")  # circle: the box has the ideal profile only
    want = frequency.frequency_split(x, 50 / 256, 5 / 256, shape=s.filter_shape, profile="gaussian",
                                     grayscale=s.grayscale, output=s.band_output)
    for got, expected in zip(training.frequency_bands(x, s), want):
        torch.testing.assert_close(got, expected)


def test_latent_mask_downsamples_by_area_and_dilates_with_a_square():
    mask = torch.zeros(1, 64, 64)
    mask[0, 32:40, 32:40] = 1.0  # exactly latent pixel (4, 4) at 8x
    m0 = training.latent_mask(mask, (8, 8))
    assert m0.shape == (1, 1, 8, 8) and m0.sum() == 1 and m0[0, 0, 4, 4] == 1
    half = torch.zeros(1, 16, 16)
    half[0, 0:1, 0:2] = 1.0  # half of latent pixel (0, 0) at 2x
    assert training.latent_mask(half, (8, 8))[0, 0, 0, 0] == pytest.approx(0.5)
    big = torch.zeros(1, 32, 32)
    big[0, 16, 16] = 1.0
    for iterations, side in [(1, 5), (2, 9)]:
        d = training.latent_mask(big, (32, 32), iterations, 5)[0, 0]
        rows, cols = d.nonzero(as_tuple=True)
        assert d.sum() == side * side and rows.min() == 16 - side // 2 and cols.max() == 16 + side // 2
    assert training.latent_mask(big, (32, 32), 1)[0, 0].sum() == 25  # the default kernel: the authors' 5x5


def test_mask_guided_latent_is_eq6():
    g = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    alpha = torch.tensor([0.9, 0.2])
    mask = (torch.rand(2, 1, 6, 6, generator=g) > 0.5).float()
    z_t = training.noisy_latent(z0, noise, alpha)
    assert torch.allclose(z_t[1], math.sqrt(0.2) * z0[1] + math.sqrt(0.8) * noise[1], atol=1e-6)
    assert training.noisy_latent(z0, noise, alpha.double()).dtype == torch.float32  # the latents' dtype, not the schedule's
    out = training.mask_guided_latent(z_t, z0, mask)
    inside = mask.expand_as(out).bool()
    assert torch.equal(out[~inside], z0[~inside]) and torch.allclose(out[inside], z_t[inside])


def test_masked_mse_is_eq7_divided_by_the_mask_area_or_the_element_count():
    """The authors' train.py divides sum_{c,h,w} M (eps_hat - eps)^2 by sum_{h,w} M ("mask_area"); the
    per-element mean also divides by the 4 channels ("elements")."""
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    mask = (torch.rand(3, 1, 5, 5, generator=g) > 0.4).float()
    per_sample = []
    for b in range(3):
        sel = mask[b, 0].bool()
        per_sample.append(((pred[b][:, sel] - target[b][:, sel]) ** 2).mean())
    mean_inside = float(torch.stack(per_sample).mean())
    assert training.masked_mse(pred, target, mask, "elements") == pytest.approx(mean_inside, rel=1e-6)
    assert training.masked_mse(pred, target, mask, "mask_area") == pytest.approx(4 * mean_inside, rel=1e-6)
    assert training.masked_mse(pred, target, mask) == training.masked_mse(pred, target, mask, "mask_area")
    # the prediction outside the mask has no influence
    moved = pred + 100.0 * (1 - mask)
    assert training.masked_mse(moved, target, mask) == pytest.approx(float(training.masked_mse(pred, target, mask)))
    pred.requires_grad_(True)
    training.masked_mse(pred, target, mask).backward()
    assert (pred.grad * (1 - mask)).abs().max() == 0 and (pred.grad * mask).abs().max() > 0
    # a soft mask of area 0.5 (one pixel at 0.5) is divided by its area, 0.5, not by a floor of 1
    soft = torch.zeros(1, 1, 5, 5)
    soft[0, 0, 2, 2] = 0.5
    want = float(((pred[0, :, 2, 2].detach() - target[0, :, 2, 2]) ** 2).sum() * 0.5 / 0.5)
    assert float(training.masked_mse(pred[:1].detach(), target[:1], soft)) == pytest.approx(want, rel=1e-6)


def test_cross_attention_mask_loss():
    maps = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    target = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert training.cross_attention_mask_loss(maps, target) == pytest.approx(0.25 / 4)


def test_reference_augmentation_moves_latent_and_mask_together():
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(4, 16, 16, generator=g) + 10.0
    mask = torch.ones(1, 16, 16)
    canvas = torch.zeros(4, 16, 16)
    pasted = cropped = 0
    for _ in range(60):
        out, m = training.augment_reference(latent, mask, canvas, g, flip=True)
        assert out.shape == latent.shape and m.shape == mask.shape
        on_canvas = (out == 0).all(dim=0)
        if on_canvas.any():
            pasted += 1
            assert torch.equal(on_canvas, m[0] == 0)  # the mask follows the pasted photo
        else:
            cropped += 1
            assert m.min() == 1
    assert pasted > 20 and cropped > 5  # p = 0.66 paste, 0.34 crop


def test_presets_and_overrides():
    official, paper = training.settings_for("official"), training.settings_for("paper")
    assert (official.p_low, official.p_high, official.p_original) == (0.1, 0.1, 0.8)
    assert official.filter_shape == "box" and paper.filter_shape == "circle"
    assert official.class_prompt == "{class_word}" and official.reference_prompt == "instance"
    assert official.masked_loss_normalisation == "mask_area" and official.detach_start_token
    assert official.reference_timestep_offset == 2 and paper.reference_timestep_offset == 0
    assert training.settings_for("paper", ra_loss_weight=0.5).ra_loss_weight == 0.5
    with pytest.raises(ValueError, match="unknown training settings: bogus"):
        training.settings_for("official", bogus=1)
    with pytest.raises(ValueError, match=re.escape("unknown training settings: bogus, zzz") + "$"):
        training.settings_for("official", zzz=1, bogus=1)
    with pytest.raises(ValueError, match=re.escape("preset must be one of official, paper, got 'nope'") + "$"):
        training.settings_for("nope")
    with pytest.raises(ValueError, match="filter_shape"):
        training.settings_for("official", filter_shape="hexagon")
    with pytest.raises(ValueError, match="p_low"):
        training.settings_for("official", p_low=-0.1)
    with pytest.raises(ValueError, match="prompt_template"):
        training.settings_for("official", prompt_template="photo of a dog")


def test_step_generator_depends_on_seed_and_step_only():
    a = torch.rand(4, generator=training.step_generator(7, 3))
    assert torch.equal(a, torch.rand(4, generator=training.step_generator(7, 3)))
    assert not torch.equal(a, torch.rand(4, generator=training.step_generator(7, 4)))
    assert not torch.equal(a, torch.rand(4, generator=training.step_generator(8, 3)))
    # the seed is (seed * 1_000_003 + step) mod 2^63, by hand: 7 * 1_000_003 + 3 = 7_000_024; for seed 2^62 the
    # product is 2^62 (mod 2^63) as 1_000_003 is odd, so step 5 seeds 2^62 + 5
    for seed, step, want in [(7, 3, 7_000_024), (2**62, 5, 2**62 + 5)]:
        assert training.step_generator(seed, step).initial_seed() == want
    assert torch.equal(a, torch.rand(4, generator=torch.Generator().manual_seed(7_000_024)))


def test_optimizer_state_round_trip():
    from eqdiff_core.rra import RRALayer

    params = training.ConceptParameters(torch.randn(8), torch.randn(8), {"w": torch.zeros(3, 8)},
                                        {"output.1.0": RRALayer(4)})
    settings = training.settings_for("official")
    opt = training.make_optimizer(params, 1e-2, settings)
    for p in params.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    saved = training.optimizer_state(opt, params)
    fresh = training.make_optimizer(params, 1e-2, settings)
    training.load_optimizer_state(fresh, params, saved)
    # the saved names are the parameters' names, dots of the layer keys written as "__"
    assert {"kv.w.exp_avg", "rra.output__1__0.h_r.weight.exp_avg_sq", "token_lf.step"} <= set(saved)
    for p in params.parameters():
        assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])
        assert float(fresh.state[p]["step"]) == 1
    with pytest.raises(ValueError, match="learning_rate"):
        training.make_optimizer(params, 0.0, settings)


def test_optimizer_state_skips_tensors_without_moments_and_loads_at_each_parameters_dtype_and_device():
    from eqdiff_core.rra import RRALayer

    params = training.ConceptParameters(torch.randn(8), torch.randn(8), {"w": torch.zeros(3, 8)},
                                        {"output.1.0": RRALayer(4)})
    settings = training.settings_for("official")
    torch.set_default_dtype(torch.float64)  # AdamW then counts its steps in float64
    try:
        opt = training.make_optimizer(params, 1e-2, settings)
        for name, p in params.named_parameters():
            p.grad = None if name == "token_lf" else torch.randn_like(p)  # token_lf: no gradient, no moments
        opt.step()
    finally:
        torch.set_default_dtype(torch.float32)
    saved = training.optimizer_state(opt, params)
    assert "token_lf.exp_avg" not in saved and saved["token_hf.step"].dtype == torch.float32  # stored as float32
    wide = training.ConceptParameters.from_concept(params.to_concept({})).double()
    fresh = training.make_optimizer(wide, 1e-2, settings)
    training.load_optimizer_state(fresh, wide, saved)
    assert wide.token_lf not in fresh.state
    for name, p in wide.named_parameters():
        if name != "token_lf":  # the tensors after the one without moments load too, at the parameter's dtype
            for moment in ("exp_avg", "exp_avg_sq"):
                loaded = fresh.state[p][moment]
                assert loaded.dtype == torch.float64 and torch.equal(loaded, saved[f"{name}.{moment}"].double()), name
    # and on the parameter's device (meta stands for an accelerator: a device other than the CPU)
    meta = training.ConceptParameters.from_concept(params.to_concept({})).to("meta")
    on_meta = training.make_optimizer(meta, 1e-2, settings)
    training.load_optimizer_state(on_meta, meta, saved)
    assert {t.device.type for p in meta.parameters() if p in on_meta.state
            for t in (on_meta.state[p]["exp_avg"], on_meta.state[p]["exp_avg_sq"])} == {"meta"}


def test_to_concept_holds_float32_copies_the_reference_context_and_the_metadata():
    from eqdiff_core.rra import RRALayer

    p = training.ConceptParameters(torch.randn(8), torch.randn(8), {"w": torch.randn(3, 8)},
                                   {"output.1.0": RRALayer(4)}).double()
    reference = torch.randn(1, 5, 8, dtype=torch.float64)
    concept = p.to_concept({"name": "x"}, reference)
    assert concept.metadata == {"name": "x"}
    assert concept.reference_context.dtype == torch.float32 and torch.equal(concept.reference_context, reference.float())
    tensors = [concept.token_lf, concept.token_hf, *concept.kv_deltas.values(), *concept.rra["output.1.0"].values()]
    assert {t.dtype for t in tensors} == {torch.float32}
    assert torch.equal(concept.token_lf, p.token_lf.detach().float())
    assert p.to_concept({}).reference_context is None


def test_reference_augmentation_scales_are_the_authors_ranges():
    """The draws replayed by hand (r = torch.rand(4) first): paste when r0 < 0.66 at side
    s = (170 + r1 * (512 - 170)) / 512, else enlarge by s = (614 + r2 * (715 - 614)) / 512 and crop;
    flip when r3 < 0.5 (the authors' train.py, at 512 px, scaled to the latent side). A ramp along x
    shows the enlargement: bilinear resizing of a ramp by s has slope w / round(w s) per pixel."""
    side = 256  # large enough that the range ends (614, 715) change round(side * s)
    ramp = torch.arange(side, dtype=torch.float32).expand(4, side, side).clone()
    mask = torch.ones(1, side, side)
    canvas = torch.full((4, side, side), -5.0)
    seen = {"paste": 0, "crop": 0}
    for seed in range(40):
        out, m = training.augment_reference(ramp, mask, canvas, torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)
        r = torch.rand(4, generator=g).tolist()
        if r[0] < 0.66:
            seen["paste"] += 1
            s = round(side * (170 + r[1] * (512 - 170)) / 512)
            top = int(torch.randint(0, side - s + 1, (1,), generator=g))
            left = int(torch.randint(0, side - s + 1, (1,), generator=g))
            want = torch.zeros(1, side, side)
            want[:, top:top + s, left:left + s] = 1.0
            assert torch.equal(m, want), seed
            assert torch.equal(out[:, m[0] == 0], canvas[:, m[0] == 0])
        else:
            seen["crop"] += 1
            big = round(side * (614 + r[2] * (715 - 614)) / 512)
            slope = (out[0, :, 2:-2].diff(dim=-1)).mean()
            assert float(slope) == pytest.approx(side / big, rel=1e-4), seed
            assert m.min() == 1
    assert seen["paste"] > 10 and seen["crop"] > 5
    # the class images' flip: r3 < 0.5 mirrors the latent before the augmentation
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        r = torch.rand(4, generator=g).tolist()
        if r[0] >= 0.66:  # the crop branch keeps the ramp's direction visible
            out, _ = training.augment_reference(ramp, mask, canvas, torch.Generator().manual_seed(seed), flip=True)
            assert (float(out[0, 0, -1] - out[0, 0, 0]) < 0) == (r[3] < 0.5), seed


def test_reference_augmentation_pastes_a_smooth_shrink_and_mirrors_before_it():
    """Paste branch: the shrunk ramp keeps the slope side / s of a resize with align_corners=False, and
    shrinking is antialiased: +-1 stripes at the Nyquist frequency are averaged down, where plain
    bilinear sampling keeps values near +-1. A flip mirrors latent and mask first and draws nothing
    more, so it equals the unflipped call on mirrored inputs."""
    side = 64
    ramp = torch.arange(side, dtype=torch.float32).expand(4, side, side).clone()
    stripes = torch.tensor([1.0, -1.0]).repeat(side // 2).expand(4, side, side).clone()
    half = torch.zeros(1, side, side)
    half[..., : side // 4] = 1.0
    canvas = torch.zeros(4, side, side)
    pasted = small = 0
    for seed in range(20):
        r = torch.rand(4, generator=torch.Generator().manual_seed(seed)).tolist()
        if r[0] < 0.66:
            pasted += 1
            s = round(side * (170 + r[1] * (512 - 170)) / 512)
            out, m = training.augment_reference(ramp, torch.ones(1, side, side), canvas, torch.Generator().manual_seed(seed))
            slope = out[0][m[0] > 0].view(s, s)[0].diff()[s // 4:-(s // 4)].mean()
            if s <= 35:  # below ~half size the antialiasing ripple stays under 0.5 %; align_corners=True is 1.2 % off
                small += 1
                assert float(slope) == pytest.approx(side / s, rel=5e-3), seed
            out, m = training.augment_reference(stripes, torch.ones(1, side, side), canvas, torch.Generator().manual_seed(seed))
            assert float(out[0][m[0] > 0].abs().max()) < 0.75, seed
        out, m = training.augment_reference(ramp, half, canvas, torch.Generator().manual_seed(seed), flip=True)
        if r[3] < 0.5:
            want = training.augment_reference(ramp.flip(-1), half.flip(-1), canvas, torch.Generator().manual_seed(seed))
        else:
            want = training.augment_reference(ramp, half, canvas, torch.Generator().manual_seed(seed))
        assert torch.equal(out, want[0]) and torch.equal(m, want[1]), seed
    assert pasted > 5 and small > 2


def test_reference_augmentation_does_not_flip_at_exactly_one_half():
    """Flip when r3 < 0.5 (the authors' train.py): seed 5838844 (found by a search over seeds) draws r3 = 0.5
    exactly, so the flip=True call equals the unflipped one."""
    ramp = torch.arange(16, dtype=torch.float32).expand(4, 16, 16).clone()
    mask, canvas = torch.ones(1, 16, 16), torch.zeros(4, 16, 16)
    assert torch.rand(4, generator=torch.Generator().manual_seed(5838844))[3] == 0.5
    flipped = training.augment_reference(ramp, mask, canvas, torch.Generator().manual_seed(5838844), flip=True)
    plain = training.augment_reference(ramp, mask, canvas, torch.Generator().manual_seed(5838844))
    assert torch.equal(flipped[0], plain[0]) and torch.equal(flipped[1], plain[1])


def test_saved_tensors_are_copied_to_the_cpu():
    """From meta parameters (an accelerator's stand-in, with no values) the copy to the CPU is refused."""
    from eqdiff_core.rra import RRALayer

    p = training.ConceptParameters(torch.randn(8), torch.randn(8), {}, {}, torch.zeros(3, 1, 2, 8)).to("meta")
    opt = training.make_optimizer(p, 1e-2, training.settings_for("official"))
    with pytest.raises(NotImplementedError, match=re.escape("Cannot copy out of meta tensor")):
        training.optimizer_state(opt, p)  # the ICO contexts
    with pytest.raises(NotImplementedError, match=re.escape("Cannot copy out of meta tensor")):
        training.ConceptParameters(torch.randn(8), torch.randn(8), {}, {"output.1.0": RRALayer(4)}).to("meta").to_concept({})


@pytest.mark.cuda
def test_cuda_parameters_get_a_fused_optimizer_and_cpu_copies():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from eqdiff_core.rra import RRALayer

    p = training.ConceptParameters(torch.randn(8), torch.randn(8), {"w": torch.randn(3, 8)}, {"output.1.0": RRALayer(4)},
                                   torch.zeros(3, 1, 2, 8)).cuda()
    opt = training.make_optimizer(p, 1e-2, training.settings_for("official"))
    assert opt.defaults["fused"] is True  # AdamW's fused CUDA kernel
    concept = p.to_concept({}, torch.randn(1, 5, 8, device="cuda"))
    assert {t.device.type for t in concept.tensors().values()} == {"cpu"}
    assert training.optimizer_state(opt, p)[training.ICO_STATE].device.type == "cpu"
    # branches on the GPU pick rows of CPU embeddings (moved to the table's device)
    lf, hf = torch.randn(8), torch.randn(8)
    assert torch.equal(training.branch_embeddings(lf, hf, torch.tensor([training.HIGH], device="cuda")), hf[None])


def test_reference_augmentation_of_a_one_pixel_latent():
    """The smallest latent: the paste is at least 1 pixel and the enlargement (round(1 * s) = 1) leaves
    only the crop at (0, 0), so every draw gives the pixel back on a full mask."""
    latent, mask, canvas = torch.full((4, 1, 1), 3.0), torch.ones(1, 1, 1), torch.zeros(4, 1, 1)
    for seed in range(20):
        out, m = training.augment_reference(latent, mask, canvas, torch.Generator().manual_seed(seed))
        assert torch.equal(out, latent) and torch.equal(m, mask), seed


@pytest.mark.parametrize("override, message", [
    ({"p_low": 0.0, "p_high": 0.0, "p_original": 0.0}, r"p_low, p_high, p_original must be >= 0 and not all 0"),
    ({"dilate_iterations": -1}, r"dilate_iterations must be >= 0 and dilate_kernel an odd number >= 1, got -1 and 5"),
    ({"dilate_kernel": 4}, r"got 5 and 4"),
    ({"dilate_kernel": 0}, r"got 5 and 0"),
    ({"reference_timestep_offset": -1}, r"reference_timestep_offset must be >= 0, got -1"),
    ({"ra_loss_weight": -0.1}, r"ra_loss_weight must be >= 0, got -0.1"),
    ({"cross_attention_loss_weight": -1.0}, r"cross_attention_loss_weight must be >= 0"),
    ({"prior_loss_weight": -1.0}, r"prior_loss_weight must be >= 0"),
    ({"weight_decay": -1.0}, r"weight_decay must be >= 0"),
    ({"max_grad_norm": -1.0}, r"max_grad_norm must be >= 0"),
    ({"low_cutoff_bins": 0.0}, r"low_cutoff_bins and high_cutoff_bins must be positive"),
    ({"high_cutoff_bins": -5.0}, r"low_cutoff_bins and high_cutoff_bins must be positive"),
    ({"high_cutoff_bins": 0.0}, r"low_cutoff_bins and high_cutoff_bins must be positive$"),
    ({"ico_prefix_tokens": 17}, re.escape("ico_prefix_tokens must be between 0 and 16 (the authors use 1 to 4), got 17") + "$"),
    ({"ico_prefix_tokens": 1, "ico_prefix_init": " "},
     re.escape("ico_prefix_init must hold a word to start the prefix contexts from (e.g. 'a photo of a')") + "$"),
    ({"ico_suffix_tokens": 1, "ico_suffix_init": ""},
     re.escape("ico_suffix_init must hold a word to start the suffix contexts from (e.g. '.')") + "$"),
    ({"resolution": 96}, r"resolution must be a multiple of 64 \(e.g. 512\), got 96"),
    ({"resolution": 0}, r"resolution must be a multiple of 64"),
    ({"masked_loss_normalisation": "pixels"}, r"masked_loss_normalisation must be one of mask_area, elements, got 'pixels'"),
    ({"class_prompt": "a {token} dog"}, r"class_prompt must not contain \{token\} \(it is a plain prompt\)"),
    ({"inference_reference_prompt": "{token}"}, r"inference_reference_prompt must not contain \{token\}"),
])
def test_each_bad_setting_is_refused_by_name(override, message):
    with pytest.raises(ValueError, match="^" + message if not message.startswith("got") else message):
        training.settings_for("official", **override)


def test_edge_settings_are_accepted():
    """The bounds themselves are valid: no dilation, a 1-pixel kernel, offset 0, zero weights, 64 px, one branch."""
    s = training.settings_for("official", dilate_iterations=0, dilate_kernel=1, reference_timestep_offset=0,
                              ra_loss_weight=0.0, cross_attention_loss_weight=0.0, prior_loss_weight=0.0,
                              weight_decay=0.0, max_grad_norm=0.0, resolution=64, p_low=0.0, p_high=0.0, p_original=1.0)
    assert s.to_dict()["resolution"] == 64 and s.to_dict()["dilate_kernel"] == 1
    # one-bin cutoffs, 16 prefix and suffix contexts, an ICO rate below the main one
    s = training.settings_for("official", low_cutoff_bins=1.0, high_cutoff_bins=1.0, ico_prefix_tokens=16,
                              ico_suffix_tokens=16, ico_lr_multiplier=0.5)
    assert (s.low_cutoff_bins, s.high_cutoff_bins, s.ico_prefix_tokens, s.ico_lr_multiplier) == (1.0, 1.0, 16, 0.5)
