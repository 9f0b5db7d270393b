"""DCI Guider on the tiny checkpoint, in-process, through SamplerCustomAdvanced's call (guider.sample)."""

import dataclasses

import pytest
import torch

import comfy.patcher_extension
import comfy.samplers
from comfy.ldm.modules import attention as comfy_attention
from comfy_runs import attention_calls, encode, pass_through_wrappers, run
from concept_factory import random_concept

from comfy_env import pack_module

PROMPT = "a photo of <testconcept> dog on the beach"
DEFAULTS = dict(prompt=PROMPT, negative="", concept_words="", class_word="", aux_noun="", dci_lambda=0.0,
                dci_fraction=0.4, cfg=6.0, uncond="shared", aux_init="independent", aux_seed=3)
STEPS = 6
# the pack's DDIM over 6 steps visits timesteps 831, 665, 499, 333, 167, 1; the code's window
# t / 1000 > 1 - 0.4 holds for 831 and 665: two steps with the auxiliary rows
WINDOW_STEPS = 2




@pytest.fixture(scope="module")
def applied(tiny, tiny_shapes):
    model, clip, vae = tiny
    concept = random_concept(*tiny_shapes, gate=None)
    m, c, _ = run("EqDiffApplyConcept", model=model, clip=clip, concept=concept, strength=1.0, token="")
    return m, c, vae, concept


def ddim(model):
    return run("EqDiffSampler", model=model, steps=STEPS, eta=0.0)


def sample_with(guider, model, seed=0, batch=1):
    """What SamplerCustomAdvanced does with a guider, the pack's DDIM and fixed noise."""
    sampler, sigmas = ddim(model)
    noise = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return guider.sample(noise, torch.zeros(batch, 4, 8, 8), sampler, sigmas, disable_pbar=True, seed=seed)


def cfg_guider(model, clip, cfg=6.0, prompt=PROMPT, negative=""):
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(encode(clip, prompt), encode(clip, negative))
    guider.set_cfg(cfg)
    return guider


def dci_guider(model, clip, **overrides):
    guider, aux_prompt = run("EqDiffDCIGuider", model=model, clip=clip, **{**DEFAULTS, **overrides})
    return guider, aux_prompt


def count_rows(model):
    """A clone of MODEL that records the rows of every UNet call (an outer APPLY_MODEL wrapper)."""
    rows = []

    def wrapper(executor, x, *args, **kwargs):
        rows.append(x.shape[0])
        return executor(x, *args, **kwargs)

    counted = model.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_rows", wrapper)
    return counted, rows


def test_empty_window_equals_cfg_guider_bit_for_bit(applied):
    """dci_fraction 0: the window is empty (t / 1000 > 1 never holds), so the guider is CFGGuider with the
    DBIM replaces and the wrapper passing through: the same latent, bit for bit, at any lambda."""
    model, clip, _, _ = applied
    plain = sample_with(cfg_guider(model, clip), model)
    for lam in (0.0, 2.0):
        guider, aux_prompt = dci_guider(model, clip, dci_fraction=0.0, dci_lambda=lam)
        assert aux_prompt == "a photo of cat on the beach"
        assert torch.equal(sample_with(guider, model), plain)


def test_minus_infinity_lambda_in_the_window_is_cfg(applied):
    """lambda = -inf is DBIM's neutral value (w_a = 0 exactly): with the window on, the concept branch gets its
    own attention output back and the auxiliary rows change nothing but the batch width."""
    model, clip, _, _ = applied
    plain = sample_with(cfg_guider(model, clip), model)
    guider, aux_prompt = dci_guider(model, clip)
    settings = dataclasses.replace(guider.settings, lam=float("-inf"))
    neutral = pack_module("nodes.comfyui.guiders").dci_guider(model, encode(clip, PROMPT), encode(clip, ""),
                                                              encode(clip, aux_prompt), settings)
    out = sample_with(neutral, model)
    assert neutral.log.last.window_evaluations == WINDOW_STEPS
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)


def test_window_adds_auxiliary_rows_and_changes_the_image(applied):
    model, clip, _, _ = applied
    plain = sample_with(cfg_guider(model, clip), model)
    for uncond, width in (("shared", 3), ("separate", 4)):
        counted, rows = count_rows(model)
        guider, _ = dci_guider(counted, clip, uncond=uncond)
        out = sample_with(guider, model)
        assert rows == [width] * WINDOW_STEPS + [2] * (STEPS - WINDOW_STEPS), uncond
        assert (out - plain).abs().max() > 1e-3, uncond
    weights = guider.log.last.mean_weights()
    layers = pack_module("nodes.comfyui.unet").attention_layers(model.get_model_object("diffusion_model"))
    assert set(weights) == {layer.key for layer in layers}
    assert all(0 < float(w.min()) and float(w.max()) < 1 for w in weights.values())


@pytest.mark.parametrize("uncond", ["shared", "separate"])
def test_the_auxiliary_latent_starts_from_its_own_noise_and_follows_ddim(applied, uncond):
    """Expected values as KSAMPLER and DDIM compute them. At the first step the latent is noise x sigma_0
    (the latent image is zero; the 6-step schedule starts at t = 831, below sigma_max, where KSAMPLER does
    not use sqrt(1 + sigma^2)), for the auxiliary row its own seeded noise; at the next window step the
    auxiliary row is the DDIM (eta 0) step d + (x - d) sigma_1 / sigma_0 from its CFG prediction
    d = x - sigma (e_u + cfg (e_a - e_u)), e_u being the concept branch's unconditional noise (uncond
    'shared', the authors') or the auxiliary latent's own (uncond 'separate', chunk 3)."""
    model, clip, _, _ = applied
    guider, _ = dci_guider(model, clip, uncond=uncond)
    seen = []

    def inner(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        seen.append((list(transformer_options["cond_or_uncond"]), x.clone(), float(t[0]), out.clone()))
        return out

    # added after the guider's own wrapper, so inside it: it sees the auxiliary latent put in
    guider.model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_inner", inner)
    sample_with(guider, model)
    (chunks, x0, s0, d0), (chunks1, x1, s1, _) = seen[:2]
    chunk_u = 1 if uncond == "shared" else 3
    assert sorted(chunks) == sorted(chunks1) == sorted({0, 1, 2, chunk_u})  # the window's two steps
    row = {c: slice(i, i + 1) for i, c in enumerate(chunks)}
    row1 = {c: slice(i, i + 1) for i, c in enumerate(chunks1)}
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # sample_with's
    aux_noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(DEFAULTS["aux_seed"]))
    torch.testing.assert_close(x0[row[0]], noise * s0)
    torch.testing.assert_close(x0[row[2]], aux_noise * s0)
    eps_u, eps_a = ((x0[row[c]] - d0[row[c]]) / s0 for c in (chunk_u, 2))
    d = x0[row[2]] - s0 * (eps_u + DEFAULTS["cfg"] * (eps_a - eps_u))
    torch.testing.assert_close(x1[row1[2]], d + (x0[row[2]] - d) * s1 / s0)


def test_post_cfg_functions_get_what_cfg_gives_them(applied):
    """Another node's post-CFG function (ComfyUI's sampler_post_cfg_function) gets, in window steps as in
    the CFG steps around them, the guider's model, its cond and uncond, the step's latent and sigma."""
    model, clip, _, _ = applied
    seen = []

    def observe(args):
        seen.append(args)
        return args["denoised"]

    hooked = model.clone()
    hooked.set_model_sampler_post_cfg_function(observe)
    guider, _ = dci_guider(hooked, clip)
    sampler, sigmas = ddim(model)
    sample_with(guider, model)
    assert guider.log.last.window_evaluations == WINDOW_STEPS and len(seen) == STEPS
    first = seen[0]
    assert first["cond"] is not None and first["uncond"] is not None and first["model"] is not None
    for args in seen:  # the same objects in window and CFG steps
        assert args["cond"] is first["cond"] and args["uncond"] is first["uncond"] and args["model"] is first["model"]
        assert tuple(args["input"].shape) == (1, 4, 8, 8) and args["cond_scale"] == 6.0
        assert observe in args["model_options"].get("sampler_post_cfg_function", [])
    assert [float(args["sigma"][0]) for args in seen] == pytest.approx([float(s) for s in sigmas[:-1]])


def test_the_weights_are_summed_over_the_window(applied):
    """A window of one step (fraction 0.2: t = 831 only) records that step's w_a; a window of two (0.4)
    the same first step plus the second: the sum less the first is again a weight in [0, 1]."""
    model, clip, _, _ = applied
    one, two = dci_guider(model, clip, dci_fraction=0.2)[0], dci_guider(model, clip)[0]
    sample_with(one, model)
    sample_with(two, model)
    first, both = one.log.last, two.log.last
    assert first.window_evaluations == 1 and both.window_evaluations == 2
    assert set(first.counts.values()) == {1} and set(both.counts.values()) == {2}
    # per layer one weight per latent position of its level: 64 at the 8 x 8 latent's own resolution
    assert all(w.ndim == 1 for w in first.weights.values()) and max(w.numel() for w in first.weights.values()) == 64
    for key, w0 in first.weights.items():
        w1 = both.weights[key] - w0
        assert 0 <= float(w0.min()) and float(w0.max()) <= 1, key
        assert -1e-6 <= float(w1.min()) and float(w1.max()) <= 1 + 1e-6, key
        assert not torch.allclose(w1, w0, rtol=1e-3, atol=0), key


def test_contexts_of_several_rows_are_folded_and_others_refused(applied):
    """ComfyUI repeats shorter contexts to a longer negative prompt's length; DBIM sums each token's
    attention over its copies. Expected value: the empty negative prompt repeated by hand to 154 tokens
    gives the image of the plain 77-token one. A context of no whole number of CLIP rows (80 tokens, made
    by hand) is refused with its length."""
    model, clip, _, _ = applied
    guider, aux_prompt = dci_guider(model, clip)
    expected = sample_with(guider, model)
    make = pack_module("nodes.comfyui.guiders").dci_guider
    empty = encode(clip, "")
    doubled = [[empty[0][0].repeat(1, 2, 1), empty[0][1]]]
    folded = make(model, encode(clip, PROMPT), doubled, encode(clip, aux_prompt), guider.settings)
    torch.testing.assert_close(sample_with(folded, model), expected, rtol=1e-4, atol=1e-4)
    assert folded.log.last.window_evaluations == WINDOW_STEPS

    def widened(cond):
        return [[torch.cat([cond[0][0], cond[0][0][:, :3]], dim=1), cond[0][1]]]

    odd = make(model, widened(encode(clip, PROMPT)), widened(empty), widened(encode(clip, aux_prompt)),
               guider.settings)
    with pytest.raises(ValueError) as raised:
        sample_with(odd, model)
    assert str(raised.value) == "DCI: a cross-attention context of 80 tokens is not whole CLIP rows"


def test_another_packs_attention_override_sees_every_call_with_its_precision(applied):
    """The DBIM replace calls ComfyUI's attention with the layer's options and precision, as ComfyUI's own
    layers do: an attention override (another pack's) sees as many calls as under plain CFG, each with the
    precision the layers were given."""
    model, clip, _, _ = applied
    with attention_calls(model) as (observed, calls):
        sample_with(cfg_guider(observed, clip), model)
        plain = len(calls)
        calls.clear()
        guider, _ = dci_guider(observed, clip)
        sample_with(guider, model)
    assert guider.log.last.window_evaluations == WINDOW_STEPS
    assert len(calls) == plain > 0 and set(calls) == {torch.float32}


def test_a_batch_of_two_samples_each_image_as_a_batch_of_one(applied):
    """Image 0 of a batch of two has the noise and auxiliary noise of a batch of one (the first rows of the
    same seeded draws), so it is that image, to batch rounding; image 1 is another."""
    model, clip, _, _ = applied
    single = sample_with(dci_guider(model, clip)[0], model)
    guider = dci_guider(model, clip)[0]
    pair = sample_with(guider, model, batch=2)
    assert guider.log.last.window_evaluations == WINDOW_STEPS
    torch.testing.assert_close(pair[:1], single, rtol=1e-4, atol=1e-4)
    assert (pair[1] - pair[0]).abs().max() > 1e-2


def test_area_conditioning_is_refused_by_name(applied):
    """A condition set to part of the image (Conditioning (Set Area)) is evaluated on that part of the
    latent alone, where the auxiliary latent does not fit."""
    import nodes

    model, clip, _, _ = applied
    guider, aux_prompt = dci_guider(model, clip)
    area = nodes.ConditioningSetArea().append(encode(clip, PROMPT), 32, 32, 0, 0, 1.0)[0]
    partial = pack_module("nodes.comfyui.guiders").dci_guider(model, area, encode(clip, ""), encode(clip, aux_prompt),
                                                              guider.settings)
    with pytest.raises(ValueError) as raised:
        sample_with(partial, model)
    assert str(raised.value) == ("DCI Guider: a condition covers part of the latent (area or mask conditioning); "
                                 "DCI needs whole-image conditions")


def test_eta_is_repeatable_by_seed_and_a_guider_samples_again(applied):
    """With eta > 0 the sampler draws noise as it goes, from the seed SamplerCustomAdvanced passes; the same
    guider samples a second time as the first (its run state is fresh, its options restored)."""
    model, clip, _, _ = applied
    guider, _ = dci_guider(model, clip)
    sampler, sigmas = run("EqDiffSampler", model=model, steps=STEPS, eta=0.8)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def sample(seed):
        with torch.inference_mode():
            return guider.sample(noise, torch.zeros(1, 4, 8, 8), sampler, sigmas, disable_pbar=True, seed=seed)

    first = sample(5)
    assert torch.equal(sample(5), first) and not torch.equal(sample(6), first)
    assert len(guider.log.runs) == 3 and guider.log.last.window_evaluations == WINDOW_STEPS


def test_the_auxiliary_wrapper_passes_on_what_it_gets(applied):
    """Between another pack's APPLY_MODEL wrappers, DCI's hands the inner one c_concat, control and the
    keyword arguments as it got them (markers that the outer wrapper puts in and the inner takes out)."""
    model, clip, _, _ = applied
    wrapped, add_inner, seen = pass_through_wrappers(model)
    guider, _ = dci_guider(wrapped, clip)
    add_inner(guider.model_patcher)
    sample_with(guider, model)
    assert guider.log.last.window_evaluations == WINDOW_STEPS
    # the window's steps with the auxiliary row, then CFG's two rows
    assert seen == [(3, True, True, "outer")] * WINDOW_STEPS + [(2, True, True, "outer")] * (STEPS - WINDOW_STEPS)


def test_a_window_step_without_dbim_is_reported(applied, caplog):
    """DBIM runs in every window step of a plain run (nothing logged); where it could not (here the
    cross-attention replaced again after the guider was made), each such step is logged with its sigma."""
    import logging

    model, clip, _, _ = applied
    guider, _ = dci_guider(model, clip)
    with caplog.at_level(logging.WARNING):
        sample_with(guider, model)
    assert "DBIM was not applied" not in caplog.text
    for layer in pack_module("nodes.comfyui.unet").attention_layers(model.get_model_object("diffusion_model")):
        guider.model_patcher.set_model_attn2_replace(
            lambda q, k, v, extra: comfy_attention.optimized_attention(q, k, v, extra["n_heads"]), *layer.patch_key)
    sampler, sigmas = ddim(model)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sample_with(guider, model)
    expected = [f"DCI Guider: DBIM was not applied at sigma {float(s):.4g}: the concept and auxiliary rows ran in "
                f"separate UNet calls (ComfyUI splits a batch when memory is short), or a node after the DCI Guider "
                f"replaced the cross-attention" for s in sigmas[:WINDOW_STEPS]]
    assert [r.getMessage() for r in caplog.records if "DBIM" in r.getMessage()] == expected


def test_pre_cfg_functions_see_the_concept_branch_as_under_cfg(applied):
    """Another node's pre-CFG function (ComfyUI's sampler_pre_cfg_function) gets, in a window step, the
    concept branch's cond and uncond with ComfyUI's arguments and cfg, and what it returns is guided. Here
    it makes the cond the uncond, so DCI samples what CFGGuider samples with the same function: the
    unconditional prediction alone, to batch rounding."""
    model, clip, _, _ = applied
    seen = []

    def unguided(args):
        seen.append((frozenset(args), len(args["conds"]), len(args["conds_out"]), args["cond_scale"]))
        cond, uncond = args["conds_out"]
        return [uncond.clone(), uncond]

    hooked = model.clone()
    hooked.set_model_sampler_pre_cfg_function(unguided)
    expected = sample_with(cfg_guider(hooked, clip), model)
    seen.clear()
    guider, _ = dci_guider(hooked, clip)
    out = sample_with(guider, model)
    assert guider.log.last.window_evaluations == WINDOW_STEPS and len(seen) == STEPS
    assert set(seen) == {(frozenset({"conds", "conds_out", "cond_scale", "timestep", "input", "sigma", "model",
                                     "model_options"}), 2, 2, 6.0)}
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert (out - sample_with(dci_guider(model, clip)[0], model)).abs().max() > 1e-2


def test_auxiliary_noise_and_lambda_matter(applied):
    model, clip, _, _ = applied
    base = sample_with(dci_guider(model, clip)[0], model)
    assert not torch.equal(base, sample_with(dci_guider(model, clip, aux_seed=4)[0], model))
    assert not torch.equal(base, sample_with(dci_guider(model, clip, aux_init="same_noise")[0], model))
    assert not torch.equal(base, sample_with(dci_guider(model, clip, dci_lambda=2.0)[0], model))
    assert torch.equal(base, sample_with(dci_guider(model, clip)[0], model))  # a second run: fresh run state


def test_a_foreign_attn2_replace_still_runs(applied):
    """Another pack's attn2 replace (here on one layer by (block, number, index), on another by (block,
    number)) keeps running under DCI, and with an empty window the result is the foreign-patched CFG's."""
    model, clip, _, _ = applied
    layers = pack_module("nodes.comfyui.unet").attention_layers(model.get_model_object("diffusion_model"))
    calls = []

    def foreign(q, k, v, extra_options):
        calls.append((tuple(extra_options["block"]), len(extra_options["cond_or_uncond"])))
        return comfy_attention.optimized_attention(q, k, v * 1.5, extra_options["n_heads"])

    patched = model.clone()
    first, last = layers[0], layers[-1]
    patched.set_model_attn2_replace(foreign, *first.patch_key)
    patched.set_model_attn2_replace(foreign, *last.patch_key[:2])
    plain = sample_with(cfg_guider(patched, clip), model)
    calls.clear()
    assert torch.equal(sample_with(dci_guider(patched, clip, dci_fraction=0.0)[0], model), plain)
    assert len(calls) == 2 * STEPS
    calls.clear()
    sample_with(dci_guider(patched, clip)[0], model)
    assert sorted(set(calls)) == sorted({(first.patch_key[:2], 3), (first.patch_key[:2], 2),
                                         (last.patch_key[:2], 3), (last.patch_key[:2], 2)})


def test_rra_acts_on_the_concept_branch_not_the_auxiliary(applied, tiny, tiny_shapes):
    """With the RRA Patch under the guider, RRA's target rows in a window step are the cond and uncond
    chunks only (read from RRA's step state by an attn1 patch), and RRA changes the image."""
    _, _, vae, _ = applied
    base_model, base_clip, _ = tiny
    concept = random_concept(*tiny_shapes, gate=0.6, seed=3)  # open gates: RRA acts
    model, clip, _ = run("EqDiffApplyConcept", model=base_model, clip=base_clip, concept=concept, strength=1.0,
                         token="")
    reference = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    rra_model = run("EqDiffRRAPatch", model=model, concept=concept, reference=reference, vae=vae, strength=1.0,
                    start_percent=0.0, end_percent=1.0, reference_noise="clean", noise_seed=0, rows="cond_uncond",
                    layers="middle+output", cache=False)[0]
    attention = pack_module("nodes.comfyui.attention")
    seen = []

    def spy(n, context, value, extra_options):
        state = extra_options.get(attention.STEP_KEY)
        if state is not None and state.target_rows:
            seen.append((list(extra_options["cond_or_uncond"]), state.rows))
        return n, context, value

    spied = rra_model.clone()
    spied.set_model_attn1_patch(spy)
    with_rra = sample_with(dci_guider(spied, clip)[0], model)
    window = [(chunks, rows) for chunks, rows in seen if 2 in chunks]
    assert window, "no window step reached RRA"
    for chunks, rows in window:
        expected = [i for i, c in enumerate(chunks) if c in (0, 1)]
        assert rows is not None and rows.tolist() == expected
    assert all(rows is None for chunks, rows in seen if 2 not in chunks)
    assert attention.run_log(rra_model).last.reference_passes >= STEPS
    assert not torch.equal(with_rra, sample_with(dci_guider(model, clip)[0], model))


def test_weights_preview(applied):
    model, clip, _, _ = applied
    guider, _ = dci_guider(model, clip)
    with pytest.raises(ValueError) as raised:
        run("EqDiffDCIWeights", guider=guider, samples={"samples": torch.zeros(1, 4, 8, 8)})
    assert str(raised.value) == ("guider: it has not sampled yet; connect the sampler's output latent to 'samples' "
                                 "so this node runs after it")
    with pytest.raises(ValueError) as raised:
        run("EqDiffDCIWeights", guider=cfg_guider(model, clip), samples={"samples": torch.zeros(1, 4, 8, 8)})
    assert str(raised.value) == "guider: connect the DCI Guider's output"
    sample_with(guider, model)
    weights, _, evaluations = pack_module("nodes.comfyui.guiders").last_weights(guider)
    recorded = guider.log.last
    assert evaluations >= 2 and set(recorded.counts.values()) == {evaluations}
    for key, mean in weights.items():  # each w_a is a branch weight in [0, 1]; the mean is sum / evaluations
        assert torch.allclose(mean * evaluations, recorded.weights[key])
        assert 0 <= float(mean.min()) and float(mean.max()) <= 1
    image = run("EqDiffDCIWeights", guider=guider, samples={"samples": torch.zeros(1, 4, 8, 8)})[0]
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert 0 <= float(image.min()) and float(image.max()) <= 1


def test_the_guider_reads_its_prompts_negative_and_cfg(applied):
    """DBIM mixes the subject's tokens of P with the noun's of P_a. Counted by hand: in PROMPT 'a photo of'
    is three tokens, the concept token one (its embedding) and 'dog' one, of eight; in P_a 'a photo of cat
    on the beach' the noun is token 3 of seven. The negative prompt and cfg reach both branches: with an
    empty window the result is CFGGuider's with the same negative and cfg, bit for bit."""
    model, clip, _, _ = applied
    settings = dci_guider(model, clip)[0].settings
    assert (settings.concept_columns, settings.concept_length, settings.aux_columns, settings.aux_length) == \
        ((3, 4), 8, (3,), 7)
    # the class word given: the word after the token is not taken for it
    assert dci_guider(model, clip, prompt="a <testconcept> on grass", class_word="dog")[1] == "a cat on grass"
    assert dci_guider(model, clip, prompt="a <testconcept> on grass")[1] == "a cat grass"
    plain = sample_with(cfg_guider(model, clip, cfg=3.0, negative="blurry"), model)
    assert not torch.equal(plain, sample_with(cfg_guider(model, clip), model))
    guider, _ = dci_guider(model, clip, dci_fraction=0.0, negative="blurry", cfg=3.0)
    assert torch.equal(sample_with(guider, model), plain)


def test_out_of_range_numbers_are_refused_before_the_run():
    """validate_inputs names these inputs, so ComfyUI leaves their range checks to it."""
    from comfy_runs import node

    validate = node("EqDiffDCIGuider").validate_inputs
    assert validate(dci_lambda=0.0, dci_fraction=0.3, cfg=6.0) is True
    assert validate(dci_lambda=0.0, dci_fraction=1.5, cfg=6.0) == "dci_fraction: 1.5 is above the maximum 1.0"
    assert validate(dci_lambda=-3.0, dci_fraction=0.3, cfg=6.0) == "dci_lambda: -3.0 is below the minimum -2.0"
    assert validate(dci_lambda=0.0, dci_fraction=0.3, cfg=500.0) == "cfg: 500.0 is above the maximum 100.0"


def test_concept_words_and_errors(applied):
    model, clip, _, _ = applied
    _, aux = dci_guider(model, clip, prompt="(<testconcept> dog:1.2) in snow, a <testconcept> dog", aux_noun="person")
    assert aux == "(person:1.2) in snow, a person"
    _, aux = dci_guider(model, clip, prompt="a fluffy dog on grass", concept_words="fluffy dog")
    assert aux == "a cat on grass"
    with pytest.raises(ValueError, match="no concept token"):
        dci_guider(model, clip, prompt="a dog on grass")
    with pytest.raises(ValueError, match="prompt: .*75 tokens"):
        dci_guider(model, clip, prompt="a <testconcept> dog " + "on grass " * 60)
    with pytest.raises(ValueError, match="aux_noun"):
        dci_guider(model, clip, aux_noun="red car")
