"""ICO contexts and PureCC's loss through the real trainer backend and node, on the tiny checkpoint."""

import os

import pytest
import torch

import comfy_runs
from comfy_env import pack_module
from comfy_runs import SIZE, photos
ICO = {"resolution": SIZE, "ico_prefix_tokens": 2, "ico_suffix_tokens": 1}


def run_trainer(registered, tiny, steps=2, **kw):
    """The shared trainer run with two photos per step, so that one step holds several photos' rows."""
    return comfy_runs.run_trainer(registered, tiny, steps, **{"name": "methods", "batch_size": 2, **kw})


@pytest.fixture(scope="module")
def pack(registered_nodes):
    return pack_module("nodes.comfyui.training"), pack_module("eqdiff_core.training"), pack_module("nodes.comfyui.tokens")


@pytest.fixture(scope="module")
def stage1(registered_nodes, tiny):
    """A concept trained without PureCC: PureCC's extractor."""
    return run_trainer(registered_nodes, tiny, steps=1, name="stage1")[0]


def backend_for(pack, tiny, settings, extractor=None):
    comfy_training, _, _ = pack
    model, clip, vae = tiny
    with torch.inference_mode(False):
        params = comfy_training.initial_parameters(model, clip, settings, photos=3)
        data = comfy_training.training_data(model, vae, *photos(), None, settings, SIZE)
        backend = comfy_training.TrainingBackend(model, clip, params, settings, token="<methods>", class_word="dog",
                                                 dtype=torch.float32, gradient_checkpointing=False, extractor=extractor)
    return params, data, backend


# -- ICO -------------------------------------------------------------------------------------------------
def test_ico_contexts_start_as_the_init_words_and_enter_the_prompt_as_tokens(tiny, pack):
    """ICO's prompt with the contexts at their initial words and a vocabulary word at the placeholder
    encodes as that plain prompt does (CLIP Text Encode's path through the training copy)."""
    _, training, tokens = pack
    _, clip, _ = tiny
    settings = training.settings_for("official", **ICO)
    params, _, backend = backend_for(pack, tiny, settings)
    with torch.inference_mode(False):
        assert tuple(params.contexts.shape) == (3, 3, 3, 768)
        words = tokens.text_rows(clip, "of a ."), tokens.text_rows(clip, "cat")
        # the defaults: the last 2 tokens of "a photo of a", the first of "."
        assert torch.equal(params.contexts[1, 2].detach(), words[0])
        encoded = backend.ico_context(words[1], words[0][None])
        plain = backend.encode(clip, "of a cat dog .")
    assert torch.allclose(encoded, plain, atol=1e-5)
    assert backend.placeholder_index == 3  # start token, 2 contexts, then the placeholder


def test_ico_contexts_get_gradient_only_from_their_own_rows_on_the_real_text_encoder(tiny, pack):
    _, training, _ = pack
    settings = training.settings_for("official", **ICO)
    params, data, backend = backend_for(pack, tiny, settings)
    batch = training.Batch(torch.tensor([1, 2]), torch.tensor([training.LOW, training.ORIGINAL]),
                           torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with torch.inference_mode(False):
        context = training.text_context(params, backend, batch)
        context[0].square().sum().backward()  # row 0 only: photo 1, LOW
    grad = params.contexts.grad
    assert grad[training.LOW, 1].abs().sum(-1).min() > 0  # every context token of that row
    grad[training.LOW, 1] = 0
    assert grad.abs().max() == 0


def test_ico_contexts_start_from_their_init_texts(tiny, pack):
    """Counted by hand: the prefix is the last M tokens of ico_prefix_init, its first token repeated in
    front when it has fewer; the suffix the first L of ico_suffix_init, its last token repeated after; the
    same for every branch and photo."""
    comfy_training, training, tokens = pack
    _, clip, _ = tiny
    table = tokens.token_table(clip).detach().float().cpu()
    vocabulary = getattr(clip.tokenizer, clip.tokenizer.clip).tokenizer.get_vocab()

    def rows(*words):
        return table[[vocabulary[w + "</w>"] for w in words]]

    for m, n, prefix, suffix in ((3, 5, ("photo", "of", "a"), ("on", "the", "grass", "grass", "grass")),
                                 (6, 1, ("a", "a", "a", "photo", "of", "a"), ("on",))):
        settings = training.settings_for("official", resolution=SIZE, ico_prefix_tokens=m, ico_suffix_tokens=n,
                                         ico_prefix_init="a photo of a", ico_suffix_init="on the grass")
        contexts = comfy_training.initial_contexts(clip, settings, photos=2)
        assert contexts.shape == (3, 2, m + n, 768)
        assert torch.equal(contexts[0, 0], torch.cat([rows(*prefix), rows(*suffix)])), (m, n)
        assert (contexts == contexts[0, 0]).all()


def test_ico_prompts_that_cannot_be_built_are_refused(registered_nodes, tiny):
    # 68 words: 'photo of a <methods> ...' (72 tokens) fits one row, 4 + 1 + 68 + 4 ICO slots do not
    long_class = " ".join(["fluffy"] * 67) + " dog"
    with pytest.raises(ValueError, match=r"ico_prefix_tokens / ico_suffix_tokens: the ICO prompt '.*' is longer "
                                         r"than one 77-token chunk; use fewer contexts or a shorter class_word"):
        run_trainer(registered_nodes, tiny, steps=1, options={**ICO, "ico_prefix_tokens": 4, "ico_suffix_tokens": 4},
                    class_word=long_class)
    # the prompt template's check refuses concept tokens and embeddings in the class word; ICO's own slot
    # text would take a context's place
    with pytest.raises(ValueError) as raised:
        run_trainer(registered_nodes, tiny, steps=1, options=ICO, class_word="<eqdiff-ico-context> dog")
    assert str(raised.value) == ("class_word: '<eqdiff-ico-context> dog' holds '<eqdiff-ico-context>', the ICO "
                                 "prompt's context slot; use plain words")


def test_a_concept_trained_with_ico_samples_as_its_saved_weights_without_contexts(registered_nodes, tiny):
    import folder_paths
    import nodes

    concept, model, clip, _, token = run_trainer(registered_nodes, tiny, steps=2, options=ICO)
    contexts = concept.training_state["ico_contexts"]
    assert tuple(contexts.shape) == (3, 3, 3, 768) and torch.isfinite(contexts).all()
    inference = concept.tensors(with_training_state=False)  # what Save Concept writes without the training state
    assert all(k.startswith(("token.", "kv.", "rra.")) or k == "reference_context" for k in inference)
    assert concept.metadata["settings"]["ico_prefix_tokens"] == 2
    name = registered_nodes["EqDiffSaveConcept"].execute(concept, "methods_ico", True, False, False).args[0]
    path = os.path.join(folder_paths.get_folder_paths("eqdiff")[0], name)
    try:
        loaded = registered_nodes["EqDiffLoadConcept"].execute(name).args[0]
    finally:
        os.remove(path)
    assert not loaded.training_state  # the contexts are not in the saved file
    base_model, base_clip, _ = tiny
    saved_model, saved_clip, saved_token = registered_nodes["EqDiffApplyConcept"].execute(
        base_model, base_clip, loaded, 1.0, "").args

    def sample(m, c, t):
        with torch.inference_mode():
            cond = nodes.CLIPTextEncode().encode(c, f"photo of a {t} dog")[0]
            uncond = nodes.CLIPTextEncode().encode(c, "")[0]
            latent = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
            return registered_nodes["EqDiffEquilibratedSampler"].execute(
                model=m, positive=cond, negative=uncond, latent_image=latent, seed=3, steps=3, cfg=5.0,
                eta=0.0).result[0]["samples"]

    assert saved_token == token
    assert torch.equal(sample(model, clip, token), sample(saved_model, saved_clip, saved_token))


def test_ico_resume_keeps_the_contexts_and_refuses_other_photos(registered_nodes, tiny):
    straight = run_trainer(registered_nodes, tiny, steps=3, options=ICO)[0]
    half = run_trainer(registered_nodes, tiny, steps=2, options=ICO)[0]
    resumed = run_trainer(registered_nodes, tiny, steps=3, options=ICO, resume_from=half)[0]
    assert resumed.metadata["loss_history"] == pytest.approx(straight.metadata["loss_history"], rel=1e-5)
    assert torch.allclose(resumed.training_state["ico_contexts"], straight.training_state["ico_contexts"], atol=1e-6)
    with pytest.raises(ValueError, match="resume_from: its ICO contexts are for 3 photos"):
        run_trainer(registered_nodes, tiny, steps=3, options=ICO, resume_from=half, photos=photos(2))


# -- PureCC ----------------------------------------------------------------------------------------------
def test_purecc_extractor_passes_read_the_stage1_weights_and_no_gradients(tiny, pack, stage1):
    _, training, _ = pack
    settings = training.settings_for("official", resolution=SIZE, purecc_weight=2.0)
    params, data, backend = backend_for(pack, tiny, settings, extractor=stage1)
    assert any(float(d.abs().max()) > 0 for d in stage1.kv_deltas.values())
    with torch.inference_mode(False):
        z = data.latents[training.ORIGINAL, :2]
        t = torch.tensor([400, 700])
        x = training.noisy_latent(z, torch.randn_like(z), backend.alphas_cumprod[t])
        base_context, empty = backend.purecc_contexts()
        ctx = base_context.expand(2, -1, -1)
        with torch.no_grad():
            extracted = backend.frozen_prediction(x, t, ctx, "extractor")
            base = backend.frozen_prediction(x, t, ctx, "base")
            reference = backend.reference_features(x, t, ctx)
            trained = backend.predict(x, t, ctx, None, recorded_rows=0).noise
        for key in params.kv_keys:  # the trained deltas, made non-zero
            params.kv_delta(key).data.normal_(0, 1e-2, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            moved = backend.predict(x, t, ctx, None, recorded_rows=0).noise
            base_again = backend.frozen_prediction(x, t, ctx, "base")
            extracted_again = backend.frozen_prediction(x, t, ctx, "extractor")
        assert reference  # the reference pass still runs on the base weights
        assert torch.equal(trained, base)                      # zero trained deltas: the base UNet
        assert not torch.allclose(moved, trained, atol=1e-6)   # the trained deltas are on for predict
        assert torch.equal(base_again, base)                   # and off for the frozen base
        assert torch.equal(extracted_again, extracted)         # the extractor reads the Stage-1 deltas only
        assert (extracted - base).abs().max() > 1e-6
        assert backend.kv_weights == "trained"


@pytest.mark.parametrize("base,reaches_kv", [("trained", True), ("frozen", False)])
def test_purecc_term_reaches_the_kv_through_eps_base_only_when_trained(tiny, pack, stage1, base, reaches_kv):
    _, training, _ = pack
    settings = training.settings_for("official", resolution=SIZE, purecc_weight=2.0, purecc_base=base)
    params, data, backend = backend_for(pack, tiny, settings, extractor=stage1)
    data.extractor_tokens = torch.stack([stage1.token_lf, stage1.token_hf])
    batch = training.Batch(torch.tensor([0, 1]), torch.tensor([training.ORIGINAL, training.HIGH]),
                           torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with torch.inference_mode(False):
        z = training.batch_latents(data, batch)[0]
        t = torch.tensor([300, 600])
        z_t = training.noisy_latent(z, torch.randn_like(z), backend.alphas_cumprod[t])
        target = training.purecc_target(backend, data, batch, z_t, t, settings)
        assert target.requires_grad == reaches_kv
        if reaches_kv:
            target.square().sum().backward()
            assert any(float(params.kv_delta(k).grad.abs().max()) > 0 for k in params.kv_keys)
            assert params.token_lf.grad is None  # y_base holds no concept token


def test_purecc_through_the_trainer_node(registered_nodes, tiny, stage1, training_calls):
    options = registered_nodes["EqDiffTrainerOptions"].execute(purecc_weight=2.0, purecc_extractor="token_only").result[0]
    assert options == {"purecc_weight": 2.0, "purecc_extractor": "token_only"}  # optional inputs: only what is set
    concept = run_trainer(registered_nodes, tiny, steps=2, options={**options, "resolution": SIZE}, purecc_stage1=stage1)[0]
    assert concept.metadata["purecc_stage1"] == "stage1"
    # the extractor's tokens in TrainingData's order: S*_LF, S*_HF
    assert torch.equal(training_calls[0]["data"].extractor_tokens, torch.stack([stage1.token_lf, stage1.token_hf]))
    assert concept.metadata["settings"]["purecc_weight"] == 2.0
    assert all(torch.isfinite(t).all() for t in concept.tensors().values())
    plain = run_trainer(registered_nodes, tiny, steps=2, purecc_stage1=stage1)[0]  # connected but off
    assert "purecc_stage1" not in plain.metadata
    assert concept.metadata["loss_history"][0] > plain.metadata["loss_history"][0]  # + eta L_PureCC >= 0, same batch
    with pytest.raises(ValueError, match="purecc_stage1: the options set purecc_weight"):
        run_trainer(registered_nodes, tiny, steps=1, options={"resolution": SIZE, "purecc_weight": 2.0})
