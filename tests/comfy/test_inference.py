"""Apply Concept, RRA Patch and the Equilibrated Sampler on the tiny checkpoint, in-process."""
# The pack is loaded by ComfyUI under its own module name, so its ConceptError (a ValueError) is not
# eqdiff_core.concept.ConceptError as imported here; the tests match ValueError and the message.

import copy

import pytest
import torch

import nodes
from comfy_runs import attention_calls, encode, node, pass_through_wrappers, run
from concept_factory import random_concept

REF = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
RRA_DEFAULTS = dict(strength=1.0, start_percent=0.0, end_percent=1.0, reference_noise="clean", noise_seed=0,
                    rows="cond_uncond", layers="middle+output", cache=True)




def sample(model, clip, seed=1, steps=3, cfg=5.0, batch=1, size=64, prompt="a photo of <testconcept> dog",
           negative=""):
    latent = nodes.EmptyLatentImage().generate(size, size, batch)[0]
    negative = encode(clip, negative) if isinstance(negative, str) else negative
    return run("EqDiffEquilibratedSampler", model=model, positive=encode(clip, prompt), negative=negative,
               latent_image=latent, seed=seed, steps=steps, cfg=cfg, eta=0.0)[0]["samples"]


def rra_patch(model, concept, vae, reference=REF, **overrides):
    return run("EqDiffRRAPatch", model=model, concept=concept, reference=reference, vae=vae,
               **{**RRA_DEFAULTS, **overrides})[0]


def last_run(model):
    """What the last sampling run of an RRA-patched MODEL (or of a clone of it) reported."""
    from comfy_env import pack_module

    return pack_module("nodes.comfyui.attention").run_log(model).last


def base_weights(model) -> dict:
    """The UNet's weights with no model loaded: a loaded clone (this or an earlier test's) holds its
    weight patches merged into the module that all clones share."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    return {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}


def snapshot(model):
    """What must not change on a source MODEL: its options, patches and weights."""
    return repr(model.model_options), sorted(model.patches), model.patches_uuid, base_weights(model)


def assert_unchanged(model, snap):
    options, patches, uuid, weights = snap
    assert repr(model.model_options) == options and sorted(model.patches) == patches
    assert model.patches_uuid == uuid
    for k, v in base_weights(model).items():
        assert torch.equal(v, weights[k]), k


@pytest.fixture(scope="module")
def applied(tiny, tiny_shapes):
    model, clip, vae = tiny
    concept = random_concept(*tiny_shapes, gate=None)
    m, c, token = run("EqDiffApplyConcept", model=model, clip=clip, concept=concept, strength=1.0, token="")
    return m, c, vae, concept


def test_a_token_that_prompts_cannot_hold_is_refused(tiny, tiny_shapes):
    model, clip, _ = tiny
    concept = random_concept(*tiny_shapes, gate=None)
    for bad in ("my dog", "(dog)", "a,b", "x:1"):
        with pytest.raises(ValueError) as raised:
            run("EqDiffApplyConcept", model=model, clip=clip, concept=concept, strength=1.0, token=bad)
        assert str(raised.value) == (f"token: {bad!r} must be one word without spaces, brackets, commas or colons, "
                                     f"e.g. <testconcept>")


def test_apply_concept_patches_kv_and_token(tiny, tiny_shapes):
    model, clip, _ = tiny
    concept = random_concept(*tiny_shapes, gate=None)
    snap = snapshot(model)
    m, c, token = run("EqDiffApplyConcept", model=model, clip=clip, concept=concept, strength=1.0, token="")
    assert token == "<testconcept>"
    assert set(concept.kv_deltas) <= set(m.patches) and not model.patches
    tokens = c.tokenize("a photo of <testconcept> dog, (<testconcept>:1.3)")["l"]
    vectors = [(t, w) for row in tokens for t, w, *_ in row if torch.is_tensor(t)]
    assert len(vectors) == 2 and [w for _, w in vectors] == [1.0, 1.3]
    assert all(torch.equal(t, concept.token_ori) for t, _ in vectors)
    assert not any(torch.is_tensor(t) for row in clip.tokenize("a photo of <testconcept> dog")["l"] for t, *_ in row)
    assert not torch.equal(encode(c, "a photo of <testconcept> dog")[0][0], encode(c, "a photo of dog")[0][0])
    assert_unchanged(model, snap)


def unet_weights_as_sampled(model) -> dict:
    """The UNet weights of a MODEL with its weight patches applied, as ComfyUI's loader applies them
    before sampling; the shared base weights are restored afterwards."""
    import comfy.model_management

    comfy.model_management.unload_all_models()  # no other patcher's weights on the shared module
    patcher = model.clone()
    patcher.patch_model(device_to=torch.device("cpu"), load_weights=True, force_patch_weights=True)
    try:
        return {k: v.detach().clone() for k, v in patcher.model.state_dict().items() if k.startswith("diffusion_model.")}
    finally:
        patcher.unpatch_model(device_to=torch.device("cpu"))


def test_applied_weights_are_base_plus_strength_times_the_files_deltas(tiny, tiny_shapes, tmp_path):
    """Expected: W + strength * delta, with W the checkpoint's weight and delta the file's ``kv.<key>``
    tensor read with safetensors itself (the format of eqdiff_core/concept.py); every other weight as is."""
    from safetensors.torch import load_file

    from eqdiff_core import concept as concept_io

    model, clip, _ = tiny
    path = concept_io.save(random_concept(*tiny_shapes, gate=None, seed=7), str(tmp_path / "c.safetensors"))
    deltas = {k.removeprefix("kv."): v for k, v in load_file(path).items() if k.startswith("kv.")}
    assert deltas and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in deltas)
    base = unet_weights_as_sampled(model)
    for strength in (1.0, 0.35, 0.0):
        m, _, _ = run("EqDiffApplyConcept", model=model, clip=clip, concept=concept_io.load(path),
                      strength=strength, token="")
        patched = unet_weights_as_sampled(m)
        assert set(patched) == set(base)
        for key, weight in base.items():
            want = weight + strength * deltas[key].to(weight.dtype) if key in deltas else weight
            assert torch.allclose(patched[key], want, atol=1e-6, rtol=0), (strength, key)
    # strength 0: the image of the base model, bit for bit
    assert torch.equal(sample(m, clip, prompt="a dog"), sample(model, clip, prompt="a dog"))


def test_fingerprints_digest_the_unet_weights_as_sampled_and_as_loaded(tiny, tiny_shapes):
    """fingerprint: the digest of the UNet weights the MODEL computes with (ComfyUI's own patching is the
    reference); base_fingerprint: of the weights before any patch. Only UNet weights count."""
    from comfy_env import pack_module

    weights = pack_module("nodes.comfyui.weights")
    model, clip, _ = tiny
    m = run("EqDiffApplyConcept", model=model, clip=clip, concept=random_concept(*tiny_shapes, gate=None, seed=5),
            strength=0.5, token="")[0]
    unet = lambda w: {k.removeprefix("diffusion_model."): v for k, v in w.items()}  # noqa: E731
    base, applied = unet(unet_weights_as_sampled(model)), unet(unet_weights_as_sampled(m))
    assert weights.fingerprint(m) == weights._digest(applied) != weights._digest(base)
    assert weights.fingerprint(model) == weights.base_fingerprint(model) == weights.base_fingerprint(m) \
        == weights._digest(base)


def test_concept_for_another_model_shape_is_rejected(tiny, tiny_shapes):
    model, clip, _ = tiny
    kv, dims = tiny_shapes
    wrong = random_concept({k: (s[0] * 2, s[1]) for k, s in kv.items()}, dims)
    with pytest.raises(ValueError, match=r"in the concept and .* in this checkpoint"):
        run("EqDiffApplyConcept", model=model, clip=clip, concept=wrong, strength=1.0, token="")
    narrow = random_concept(kv, dims, token_dim=512)
    with pytest.raises(ValueError, match="512-d token embeddings"):
        run("EqDiffApplyConcept", model=model, clip=clip, concept=narrow, strength=1.0, token="")


def test_closed_gate_through_the_attention_path_is_an_exact_identity(applied, tiny_shapes):
    """Random H_r whose gate clamps to 0 everywhere: the reference passes and reference attention run,
    and the output is still bit-identical to the unpatched model's."""
    m, c, vae, _ = applied
    concept = random_concept(*tiny_shapes, gate=-1e4, seed=5)
    patched = rra_patch(m, concept, vae, cache=False)
    assert torch.equal(sample(patched, c, batch=2), sample(m, c, batch=2))
    assert last_run(patched).reference_passes == 3


@pytest.fixture(scope="module")
def gated(tiny, tiny_shapes):
    model, clip, vae = tiny
    concept = random_concept(*tiny_shapes, gate=0.6, seed=3)
    m, c, _ = run("EqDiffApplyConcept", model=model, clip=clip, concept=concept, strength=1.0, token="")
    return m, c, vae, concept


def test_nonzero_gate_changes_only_the_patched_layers(gated):
    m, c, vae, concept = gated
    patched = rra_patch(m, concept, vae, layers="output", cache=False)
    dm = m.get_model_object("diffusion_model")
    seen = []
    hook = dm.middle_block[-1].register_forward_hook(lambda mod, inp, out: seen.append(out[:2].clone()))
    try:
        out_rra, out_plain = sample(patched, c, steps=2), sample(m, c, steps=2)
    finally:
        hook.remove()
    assert not torch.equal(out_rra, out_plain)
    # the middle block is upstream of every output-block RRA layer: at the first step (same input)
    # its activations are the same with and without RRA (to float rounding: the reference rows ride in
    # the same batch); later steps start from different latents
    assert len(seen) == 4 and torch.allclose(seen[0], seen[2], atol=1e-5, rtol=0)
    assert not torch.allclose(seen[1], seen[3], atol=1e-3, rtol=0)


def test_source_model_is_unchanged_by_patching_and_sampling(gated):
    m, c, vae, concept = gated
    snap = snapshot(m)
    patched = rra_patch(m, concept, vae)
    sample(patched, c)
    assert_unchanged(m, snap)
    assert "eqdiff_rra" not in repr(m.wrappers)


@pytest.mark.parametrize("batch", [1, 4])
def test_one_reference_pass_per_step_then_cache_hits(gated, batch):
    m, c, vae, concept = gated
    patched = rra_patch(m, concept, vae)
    first = sample(patched, c, batch=batch, steps=4)
    assert last_run(patched).stats == {"reference_passes": 4, "cache_hits": 0}
    second = sample(patched, c, batch=batch, steps=4, seed=9, prompt="<testconcept> on the moon")
    assert last_run(patched).stats == {"reference_passes": 0, "cache_hits": 4}
    assert not torch.equal(first, second)
    uncached = rra_patch(m, concept, vae, cache=False)
    # the cached features are the computed ones: the same image up to the rounding of another batch shape
    recomputed = sample(uncached, c, batch=batch, steps=4, seed=9, prompt="<testconcept> on the moon")
    assert torch.allclose(recomputed, second, rtol=1e-4, atol=1e-3)
    assert last_run(uncached).stats == {"reference_passes": 4, "cache_hits": 0}


def test_cache_recomputes_for_other_weights_reference_or_schedule(gated, tiny_shapes):
    m, c, vae, concept = gated
    patched = rra_patch(m, concept, vae)
    sample(patched, c, steps=3)
    assert last_run(patched).reference_passes == 3
    # other weights: a weight patch added downstream of the RRA Patch (as a LoRA loader would)
    other = patched.clone()
    key = next(iter(concept.kv_deltas))
    other.add_patches({key: (torch.ones_like(concept.kv_deltas[key]) * 0.01,)}, 1.0)
    sample(other, c, steps=3)
    assert last_run(other).stats == {"reference_passes": 3, "cache_hits": 0}
    # another schedule: new sigmas are computed, shared ones would be valid and are served
    sample(patched, c, steps=5)
    run = last_run(patched)
    assert run.reference_passes > 0 and run.reference_passes + run.cache_hits == 5
    # another reference: its own features
    other_ref = rra_patch(m, concept, vae, reference=torch.rand(1, 64, 64, 3))
    sample(other_ref, c, steps=3)
    assert last_run(other_ref).reference_passes == 3
    assert not torch.equal(sample(other_ref, c, steps=3), sample(patched, c, steps=3))


def branch_predictions(model, clip, steps=3):
    """Per step, the conditional and unconditional denoised predictions (a post-CFG hook)."""
    seen = []

    def record(args):
        seen.append((args["cond_denoised"].clone(), args["uncond_denoised"].clone()))
        return args["denoised"]

    hooked = model.clone()
    hooked.set_model_sampler_post_cfg_function(record)
    sample(hooked, clip, steps=steps)
    return seen


def test_rows_cond_gives_rra_to_the_conditional_rows_only(gated):
    """At the first step (the same input latent for all three runs): rows="cond" has the conditional
    prediction of full RRA and the unconditional prediction of the unpatched model (to the float
    rounding of another batch shape)."""
    m, c, vae, concept = gated
    full = branch_predictions(rra_patch(m, concept, vae, cache=False), c)[0]
    cond_only = branch_predictions(rra_patch(m, concept, vae, rows="cond", cache=False), c)[0]
    plain = branch_predictions(m, c)[0]
    for branch in (0, 1):  # RRA moves both branches when both get it
        assert (full[branch] - plain[branch]).abs().max() > 1e-2
    assert torch.allclose(cond_only[0], full[0], atol=1e-4, rtol=0)
    assert torch.allclose(cond_only[1], plain[1], atol=1e-4, rtol=0)


def test_window_runs_rra_at_the_steps_whose_sigma_lies_in_it(gated):
    """Expected by hand: the steps whose sigma lies in [sigma(end_percent), sigma(start_percent)],
    with ComfyUI's own percent -> sigma map and the sampler's DDIM sigmas."""
    from comfy_env import pack_module

    m, c, vae, concept = gated
    steps = 4
    sigmas = pack_module("nodes.comfyui.sampling").ddim_schedule(m, steps)[:-1].tolist()
    ms = m.get_model_object("model_sampling")
    plain = sample(m, c, steps=steps)
    counts = {}
    for start, end in ((0.0, 0.5), (0.5, 1.0), (1.0, 1.0)):
        patched = rra_patch(m, concept, vae, start_percent=start, end_percent=end, cache=False)
        out = sample(patched, c, steps=steps)
        high, low = float(ms.percent_to_sigma(start)), float(ms.percent_to_sigma(end))
        counts[start, end] = sum(low <= s <= high for s in sigmas)
        assert last_run(patched).reference_passes == counts[start, end], (start, end)
        assert torch.equal(out, plain) == (counts[start, end] == 0), (start, end)
    # the two halves split the steps between them; strength 0 is held by tests/e2e/test_method_effects.py
    assert counts[0.0, 0.5] > 0 and counts[0.5, 1.0] > 0 and counts[0.0, 0.5] + counts[0.5, 1.0] == steps
    assert counts[1.0, 1.0] == 0


def test_noised_reference_is_seeded(gated):
    m, c, vae, concept = gated
    a = sample(rra_patch(m, concept, vae, reference_noise="noised", noise_seed=1, cache=False), c)
    b = sample(rra_patch(m, concept, vae, reference_noise="noised", noise_seed=1, cache=False), c)
    other = sample(rra_patch(m, concept, vae, reference_noise="noised", noise_seed=2, cache=False), c)
    assert torch.equal(a, b) and not torch.equal(a, other)


def test_same_seed_same_image(gated):
    m, c, vae, concept = gated
    patched = rra_patch(m, concept, vae, cache=False)
    assert torch.equal(sample(patched, c, seed=5), sample(patched, c, seed=5))
    assert not torch.equal(sample(patched, c, seed=5), sample(patched, c, seed=6))


def test_reference_that_does_not_fit(gated, tiny_shapes):
    m, c, vae, concept = gated
    with pytest.raises(ValueError, match="reference: got a batch of 2 images"):
        rra_patch(m, concept, vae, reference=torch.rand(2, 64, 64, 3))
    with pytest.raises(ValueError, match="too small"):
        rra_patch(m, concept, vae, reference=torch.rand(1, 16, 16, 3))
    no_rra = copy.copy(concept)
    no_rra.rra = {}
    with pytest.raises(ValueError, match="has no RRA layers"):
        rra_patch(m, no_rra, vae)
    output_only = random_concept(*tiny_shapes, gate=0.5, layers=("output",))
    with pytest.raises(ValueError, match="none is in 'middle'"):
        rra_patch(m, output_only, vae, layers="middle")


def test_other_packs_patches_and_wrappers_keep_working(gated):
    """With a foreign attn2 patch and APPLY_MODEL wrapper the reference gets a call of its own; the
    result equals the shared-call path, and the foreign patch and wrapper still run."""
    import comfy.patcher_extension

    m, c, vae, concept = gated
    shared = sample(rra_patch(m, concept, vae, cache=False), c, batch=2)
    other = m.clone()
    calls, wrapped = [], []

    def foreign_patch(n, context, value, extra_options):  # leaves the activations alone
        calls.append(n.shape[0])
        return n, context, value

    other.set_model_attn2_patch(foreign_patch)

    def foreign_wrapper(executor, *args, **kwargs):
        wrapped.append(args[0].shape[0])
        return executor(*args, **kwargs)

    other.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "another_pack", foreign_wrapper)
    patched = rra_patch(other, concept, vae, cache=False)
    separate = sample(patched, c, batch=2)
    assert calls and wrapped
    assert last_run(patched).reference_passes == 3
    assert wrapped == [4, 4, 4]  # the foreign wrapper is outside ours: it sees each step's target call
    assert set(calls) == {2, 4}  # inside, the reference got a call of its own (a row per CFG branch) beside 2 x 2
    assert torch.allclose(separate, shared, rtol=1e-4, atol=1e-3)  # batch shapes differ: float rounding only


def recording_calls(model):
    """A clone of MODEL with another pack's attn2 patch, which leaves the activations alone and records
    (rows, text length) at each UNet call; beside it the reference rows never share the target call."""
    calls = []

    def recorder(n, context, value, extra_options):
        calls.append((n.shape[0], context.shape[1]))
        return n, context, value

    other = model.clone()
    other.set_model_attn2_patch(recorder)
    return other, calls


def test_texts_of_other_lengths_are_repeated_to_a_common_one(gated):
    """Texts of 154 tokens beside 77-token ones: the shorter are repeated, which leaves attention
    unchanged. Expected values: the same texts repeated by hand, which takes another path (stated)."""
    m, c, vae, concept = gated
    long_prompt = "a photo of <testconcept> dog, " + ", ".join(["on a sunny beach with palm trees"] * 12)
    assert encode(c, long_prompt)[0][0].shape[1] == 154
    # 1. a 154-token prompt: the reference rows share the target call, the reference text (77) repeated;
    # by hand: a reference text of 154 tokens, which needs no repeating
    patched = rra_patch(m, concept, vae, cache=False)
    repeated = sample(patched, c, prompt=long_prompt)
    assert last_run(patched).reference_passes == 3
    by_hand = [[concept.reference_context[None].repeat(1, 2, 1), {}]]
    expected = sample(rra_patch(m, concept, vae, cache=False, reference_conditioning=by_hand), c, prompt=long_prompt)
    assert torch.allclose(repeated, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(repeated, sample(m, c, prompt=long_prompt), atol=1e-2)  # RRA acted
    # 2. a 154-token reference text with 77-token prompts: a call of its own, the negative repeated;
    # by hand: the negative at 154 tokens, with which the reference rows share the target call
    reference = encode(c, long_prompt)
    other, calls = recording_calls(m)
    own_call = sample(rra_patch(other, concept, vae, cache=False, reference_conditioning=reference), c)
    assert set(calls) == {(2, 77), (2, 154)}  # the target rows, then both reference rows at 154 tokens
    empty = encode(c, "")
    negative = [[empty[0][0].repeat(1, 2, 1), empty[0][1]]]
    patched = rra_patch(m, concept, vae, cache=False, reference_conditioning=reference)
    shared = sample(patched, c, negative=negative)
    assert torch.allclose(own_call, shared, rtol=1e-4, atol=1e-4)


def test_reference_rows_whose_texts_share_no_length_get_a_call_each(gated):
    """A 154-token reference text and a 231-token negative prompt: neither length divides the other, so
    the reference rows run one UNet call each. Expected value: the same reference text repeated to 462
    tokens, which shares one call with the negative repeated twice; repeating all keys of an attention
    leaves it unchanged, so both give the same image up to float rounding."""
    m, c, vae, concept = gated
    reference = encode(c, "a photo of a dog, " + ", ".join(["on a sunny beach with palm trees"] * 12))
    negative = ", ".join(["blurry, dark, low quality, cropped, out of frame"] * 15)
    assert reference[0][0].shape[1] == 154 and encode(c, negative)[0][0].shape[1] == 231
    repeated = [[reference[0][0].repeat(1, 3, 1), reference[0][1]]]
    other, calls = recording_calls(m)
    own_calls = sample(rra_patch(other, concept, vae, cache=False, reference_conditioning=reference), c,
                       negative=negative)
    per_row = set(calls)
    calls.clear()
    one_call = sample(rra_patch(other, concept, vae, cache=False, reference_conditioning=repeated), c,
                      negative=negative)
    assert per_row == {(2, 231), (1, 154), (1, 231)}  # the target rows, then each reference row alone
    assert set(calls) == {(2, 231), (2, 462)}
    assert torch.allclose(own_calls, one_call, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(own_calls, sample(m, c, negative=negative), atol=1e-2)  # RRA acted


def test_another_packs_attention_override_sees_every_call_with_its_precision(gated):
    """RRA's replaces (the reference attention on attn1, the base-weight keys on attn2) call ComfyUI's
    attention with the layer's options and precision, as ComfyUI's own layers do: an attention override
    (another pack's) sees each of them, with the precision the layers were given."""
    m, c, vae, concept = gated
    with attention_calls(m) as (observed, calls):
        sample(observed, c)
        plain = len(calls)
        calls.clear()
        patched = rra_patch(observed, concept, vae, cache=False)
        sample(patched, c)
    assert last_run(patched).reference_passes == 3
    assert len(calls) == plain > 0 and set(calls) == {torch.float32}  # the reference rows share the calls


def test_rra_passes_on_what_the_target_rows_get(gated):
    """Between another pack's APPLY_MODEL wrappers, RRA's hands the target call c_concat, control and the
    keyword arguments as it got them (markers that the outer wrapper puts in and the inner takes out); the
    reference rows, in a call of their own then, get none of them."""
    m, c, vae, concept = gated
    wrapped, add_inner, seen = pass_through_wrappers(m)
    patched = rra_patch(wrapped, concept, vae, cache=False)
    add_inner(patched)
    sample(patched, c)
    assert last_run(patched).reference_passes == 3
    # each step: the reference rows (one per CFG branch) alone, then the target rows with what they got
    assert seen == [(2, False, False, "outer"), (2, True, True, "outer")] * 3


def test_the_feature_cache_keeps_the_most_recently_used_entries(tiny):
    from comfy_env import pack_module

    cache = pack_module("nodes.comfyui.attention").ReferenceFeatureCache(max_entries=2)
    base = tiny[0].model
    cache.put(base, "a", {"f": 1})
    cache.put(base, "b", {"f": 2})
    assert cache.get(base, "a") == {"f": 1}  # a is now the most recently used
    cache.put(base, "c", {"f": 3})  # over the limit: the least recently used, b, goes
    assert cache.get(base, "b") is None and cache.get(base, "a") == {"f": 1} and cache.get(base, "c") == {"f": 3}


def test_strength_scales_the_gate(tiny, tiny_shapes):
    """strength s scales M^f. With a gate row of weight 0 and bias b, M^f = b everywhere, so strength 0.5
    at b = 0.5 is strength 1 at b = 0.25 (Eq. 9 reads only M^f)."""
    model, clip, vae = tiny

    def constant_gate(bias):
        concept = random_concept(*tiny_shapes, gate=0.6, seed=4)
        for params in concept.rra.values():
            params["h_r.weight"][-1] = 0.0
            params["h_r.bias"][-1] = bias
        return concept

    def rra_at(bias, strength):  # each concept on its own model: RRA reads the K/V deltas of its own concept
        concept = constant_gate(bias)
        m, c, _ = run("EqDiffApplyConcept", model=model, clip=clip, concept=concept, strength=1.0, token="")
        return sample(rra_patch(m, concept, vae, strength=strength, cache=False), c)

    scaled = rra_at(0.5, 0.5)
    assert torch.allclose(scaled, rra_at(0.25, 1.0), rtol=0, atol=1e-6)
    assert not torch.allclose(scaled, rra_at(0.5, 1.0), atol=1e-3)


def test_the_rra_window_is_checked_before_the_run():
    """validate_inputs names the window's inputs, so ComfyUI leaves their range checks to it."""
    validate = node("EqDiffRRAPatch").validate_inputs
    assert validate(start_percent=0.5, end_percent=0.5) is True
    assert validate(start_percent=0.6, end_percent=0.4) == "start_percent (0.6) must not be after end_percent (0.4)"
    assert validate(start_percent=0.0, end_percent=1.5) == "end_percent: 1.5 is above the maximum 1.0"
    assert validate(start_percent=-0.1, end_percent=1.0) == "start_percent: -0.1 is below the minimum 0.0"


def test_reference_maps_show_the_gate_and_the_subject_share(tiny, tiny_shapes):
    model, clip, vae = tiny
    concept = random_concept(*tiny_shapes, gate=0.6, seed=4)
    biases = torch.linspace(0.1, 0.5, len(concept.rra)).tolist()
    for params, bias in zip(concept.rra.values(), biases):
        params["h_r.weight"][-1] = 0.0
        params["h_r.bias"][-1] = bias  # M^f = clamp(bias) = bias at every position of the layer
    m, c, _ = run("EqDiffApplyConcept", model=model, clip=clip, concept=concept, strength=1.0, token="")
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))}
    common = dict(model=m, concept=concept, reference=REF, vae=vae, positive=encode(c, "a photo of <testconcept> dog"),
                  latent=latent, percent=0.5, seed=0)
    gate, share, received = run("EqDiffReferenceMaps", **common, reference_mask=torch.ones(1, 64, 64))
    mean_gate = sum(biases) / len(biases)  # the gate image: M^f averaged over every RRA layer
    assert gate.shape == (1, 64, 64, 3) and torch.allclose(gate, torch.full_like(gate, mean_gate), atol=1e-6)
    assert torch.allclose(share, torch.ones_like(share), atol=1e-4)  # every row of A sums to 1
    # normalised by its largest value (1 before the token grid is resampled to the latent), and not flat
    assert 0.9 < float(received.max()) <= 1.0 and float(received.min()) >= 0
    assert float(received.min()) < 0.9 * float(received.max())
    later = run("EqDiffReferenceMaps", **{**common, "percent": 0.9}, reference_mask=torch.ones(1, 64, 64))[2]
    assert not torch.allclose(later, received, atol=1e-3)  # another noise level, other maps
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1.0
    half = run("EqDiffReferenceMaps", **common, reference_mask=left)[1]
    assert 0.0 < float(half.mean()) < 1.0
    none = run("EqDiffReferenceMaps", **common)[1]
    assert float(none.max()) == 0.0
    closed = random_concept(*tiny_shapes, gate=None, seed=5)  # zero H_r: untrained
    with pytest.raises(ValueError, match="every RRA gate is closed"):
        run("EqDiffReferenceMaps", **{**common, "concept": closed})
