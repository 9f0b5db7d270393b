"""The FDTE trainer on the tiny checkpoint through real ComfyUI: the step, the node, resume, failures."""

import os

import pytest
import torch

from comfy_env import pack_module
from comfy_runs import SIZE, photos, progress_reports, run_trainer


@pytest.fixture(scope="module")
def pack(registered_nodes):
    """The training backend and the core training module, as ComfyUI imported them."""
    from comfy_env import pack_module

    return pack_module("nodes.comfyui.training"), pack_module("eqdiff_core.training")


@pytest.fixture(scope="module")
def session(registered_nodes, tiny, pack):
    """A training session on the tiny model: parameters, data, backend (fp32, 64 px)."""
    comfy_training, training = pack
    model, clip, vae = tiny
    settings = training.settings_for("official", resolution=SIZE)
    images, masks = photos()
    with torch.inference_mode(False):
        params = comfy_training.initial_parameters(model, clip, settings)
        data = comfy_training.training_data(model, vae, images, masks, None, settings, SIZE)
        backend = comfy_training.TrainingBackend(model, clip, params, settings, token="<unit>", class_word="dog",
                                       dtype=torch.float32, gradient_checkpointing=False)
    return params, data, backend, settings


def own_weights(patcher, module) -> dict:
    """The weights of this MODEL, CLIP or VAE: clones share one module, and the loaded clone's patches are in it
    (which clone another test left loaded depends on what ComfyUI unloaded for memory), so load this one first."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical. Not torch.equal: ComfyUI leaves SD1's unused CLIP-L text_projection uninitialised
    (supported_models pops it from the checkpoint; the layer is made with torch.empty), so it can hold NaN
    bit patterns, left by whatever used that memory before, and NaN != NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


def test_frozen_weights_are_untouched_and_only_the_concept_changes(registered_nodes, tiny):
    model, clip, vae = tiny
    parts = [(model, model.get_model_object("diffusion_model")), (clip.patcher, clip.cond_stage_model),
             (vae.patcher, vae.first_stage_model)]
    before = [own_weights(*part) for part in parts]
    concept, out_model, out_clip, plot, token = run_trainer(registered_nodes, tiny, steps=2)
    after = [own_weights(*part) for part in parts]
    for b, a in zip(before, after):
        assert b.keys() == a.keys() and all(same_bits(b[k], a[k]) for k in b)
    assert token == "<unit>" and plot.shape[0] == 1 and plot.shape[-1] == 3
    assert concept.metadata["training_step"] == 2 and len(concept.metadata["loss_history"]) == 2
    assert concept.reference_context.shape == (77, 768)
    assert any(float(d.abs().max()) > 0 for d in concept.kv_deltas.values())
    assert any(float(p["h_r.weight"].abs().max()) > 0 for p in concept.rra.values())
    assert out_model is not model and out_clip is not clip and len(out_model.patches) == len(concept.kv_deltas)


def test_training_works_inside_inference_mode(registered_nodes, tiny):
    """The server runs nodes under torch.inference_mode and loads weights as inference tensors; the
    concept is the one trained from weights loaded outside it (the same seed)."""
    import nodes

    with torch.inference_mode():
        loaded = nodes.CheckpointLoaderSimple().load_checkpoint("eqdiff_tiny_sd15.safetensors")[:3]
        concept = run_trainer(registered_nodes, loaded, steps=1)[0]
    assert concept.metadata["training_step"] == 1
    expected = run_trainer(registered_nodes, tiny, steps=1)[0].tensors()
    trained = concept.tensors()
    assert trained.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.allclose(trained[key], value, rtol=1e-5, atol=1e-6), key


def test_loss_falls_when_overfitting_a_fixed_batch(session, pack):
    _, training = pack
    params, data, backend, settings = session
    with torch.inference_mode(False):
        fresh = type(params).from_concept(params.to_concept({}))
        backend.set_parameters(fresh)
        try:
            opt = training.make_optimizer(fresh, 3e-3, settings)
            losses = []
            for _ in range(6):
                loss, _, _ = training.training_step(fresh, backend, data, settings, 1, training.step_generator(5, 0))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            backend.set_parameters(params)
    assert losses[-1] < 0.7 * losses[0], losses


class Recorder:
    """The real backend, with the UNet input and output kept (and optionally the output changed)."""

    def __init__(self, inner, change=None):
        self.inner, self.change, self.inputs = inner, change, []
        self.alphas_cumprod = inner.alphas_cumprod

    def instance_context(self, e):
        return self.inner.instance_context(e)

    def class_context(self):
        return self.inner.class_context()

    def reference_context(self):
        return self.inner.reference_context()

    def reference_features(self, *a):
        return self.inner.reference_features(*a)

    def predict(self, x, t, context, reference, recorded_rows):
        self.inputs.append(x.detach().clone())
        out = self.inner.predict(x, t, context, reference, recorded_rows)
        if self.change is not None:
            out.noise = self.change(out.noise)
        return out


def test_mgdp_keeps_the_background_clean_and_the_loss_ignores_it(tiny, session, pack):
    comfy_training, training = pack
    params, _, backend, _ = session
    settings = training.settings_for("official", resolution=SIZE, p_low=0.0, p_high=0.0, p_original=1.0,
                                     ra_loss_weight=0.0, cross_attention_loss_weight=0.0, dilate_iterations=1,
                                     dilate_kernel=3)
    rec = Recorder(backend)
    with torch.inference_mode(False):
        data = comfy_training.training_data(tiny[0], tiny[2], *photos(), None, settings, SIZE)
        n = data.photos
        loss, _, _ = training.training_step(params, rec, data, settings, n, training.step_generator(1, 0))
    order = torch.randperm(n, generator=training.step_generator(1, 0))  # the step's first draw
    z0, mask = data.latents[training.ORIGINAL, order], data.loss_masks[order].expand(-1, 4, -1, -1)
    x = rec.inputs[0]
    outside = mask == 0
    assert outside.any() and (mask == 1).any()
    assert torch.equal(x[outside], z0[outside])            # Eq. 6: background = z_0
    assert (x[mask == 1] - z0[mask == 1]).abs().max() > 0.1  # the subject is noised
    background = (data.loss_masks[order] == 0).float()
    moved = Recorder(backend, change=lambda eps: eps + 50.0 * background)
    with torch.inference_mode(False):
        loss_moved, _, batch = training.training_step(params, moved, data, settings, n, training.step_generator(1, 0))
    assert float(loss_moved.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)  # Eq. 7: outside M ignored
    assert batch.branches.tolist() == [training.ORIGINAL] * n
    high = Recorder(backend)
    settings_high = training.settings_for("official", resolution=SIZE, p_low=0.0, p_high=1.0, p_original=0.0,
                                          ra_loss_weight=0.0, cross_attention_loss_weight=0.0, dilate_iterations=1,
                                          dilate_kernel=3)
    with torch.inference_mode(False):
        _, _, batch = training.training_step(params, high, data, settings_high, n, training.step_generator(1, 0))
    assert batch.branches.tolist() == [training.HIGH] * n  # Eq. 5 with p_h = 1: the high band's latent
    assert torch.equal(high.inputs[0][outside], data.latents[training.HIGH, order].expand(-1, 4, -1, -1)[outside])


def test_reference_attention_loss_reaches_only_rra_parameters(session, pack):
    _, training = pack
    params, data, backend, settings = session
    from eqdiff_core import rra

    with torch.inference_mode(False):
        z = data.latents[training.ORIGINAL, :2]
        t = torch.tensor([500, 500])
        x = training.noisy_latent(z, torch.randn_like(z), backend.alphas_cumprod[t])
        bank = backend.reference_features(x, t, backend.class_context().expand(2, -1, -1))
        context = backend.instance_context(training.branch_embeddings(params.token_lf, params.token_hf,
                                                                      torch.tensor([2, 2])))
        out = backend.predict(x, t, context, bank, recorded_rows=2)
        a = out.reference_attention
        assert a is not None and a.shape[1] == a.shape[2]
        side = int(a.shape[1] ** 0.5)
        m = torch.zeros(2, side * side)
        m[:, : side * side // 2] = 1
        params.zero_grad()
        rra.reference_attention_loss(a, m, m).backward()
    grads = {n: p.grad for n, p in params.named_parameters()}
    moved = [n for n, g in grads.items() if g is not None and g.abs().max() > 0]
    assert moved and all("to_k_res" in n for n in moved), moved
    params.zero_grad()


def test_trained_context_equals_the_inference_encoding(registered_nodes, tiny, session):
    params, data, backend, settings = session
    import nodes

    model, clip, _ = tiny
    with torch.inference_mode(False):
        concept = params.to_concept({"name": "unit", "token": "<unit>"})
        trained = backend.instance_context((params.token_lf + params.token_hf).detach()[None])
    _, concept_clip, token = registered_nodes["EqDiffApplyConcept"].execute(model, clip, concept, 1.0, "<unit>").args
    cond = nodes.CLIPTextEncode().encode(concept_clip, f"photo of a {token} dog")[0][0][0]
    assert torch.allclose(trained.cpu(), cond.float(), atol=1e-5)


def test_checkpointing_gives_the_same_gradients(registered_nodes, tiny, pack):
    comfy_training, training = pack
    model, clip, vae = tiny
    settings = training.settings_for("official", resolution=SIZE)
    images, masks = photos()
    grads = []
    with torch.inference_mode(False):
        data = comfy_training.training_data(model, vae, images, masks, None, settings, SIZE)
        for ckpt in (False, True):
            params = comfy_training.initial_parameters(model, clip, settings)
            with torch.no_grad():
                for layer in params.rra.values():
                    layer.h_r.bias[-1] = 0.5  # open the gates so RRA is on the path
            backend = comfy_training.TrainingBackend(model, clip, params, settings, token="<unit>", class_word="dog",
                                           dtype=torch.float32, gradient_checkpointing=ckpt)
            loss, _, _ = training.training_step(params, backend, data, settings, 2, training.step_generator(0, 0))
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4), name


def test_a_checkpointed_layer_recomputes_with_the_arguments_of_its_first_call(pack):
    """ComfyUI changes transformer_options after a layer returns, before backward recomputes the layer;
    the recomputation must see the dictionaries (positional or keyword) as they were at the call."""
    comfy_training, _ = pack
    seen = []

    def forward(x, options, scale=1.0, extra=None):
        seen.append((dict(options), dict(extra)))
        return x * x * scale  # saves x for backward, so backward recomputes the layer

    layer = comfy_training._checkpointed(forward)
    options, extra = {"block": ("input", 1)}, {"index": 0}
    x = torch.ones(3, requires_grad=True)
    with torch.inference_mode(False):
        y = layer(x, options, scale=2.0, extra=extra)
        options["block"], extra["index"] = ("output", 9), 5  # as ComfyUI's walk over the UNet does
        y.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 4.0))  # d(2 x^2)/dx at 1
    assert seen == [({"block": ("input", 1)}, {"index": 0})] * 2  # the call, then the recomputation


def test_resume_continues_as_an_uninterrupted_run(registered_nodes, tiny):
    straight = run_trainer(registered_nodes, tiny, steps=3)[0]
    half = run_trainer(registered_nodes, tiny, steps=2)[0]
    assert half.training_state and half.metadata["training_step"] == 2
    resumed = run_trainer(registered_nodes, tiny, steps=3, resume_from=half)[0]
    assert resumed.metadata["training_step"] == 3
    assert resumed.metadata["loss_history"] == pytest.approx(straight.metadata["loss_history"], rel=1e-5)
    a, b = straight.tensors(with_training_state=False), resumed.tensors(with_training_state=False)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_the_node_hands_its_inputs_to_the_training_loop(registered_nodes, tiny, training_calls):
    class_images = photos(2, seed=1)[0]
    concept = run_trainer(registered_nodes, tiny, steps=1, seed=7, batch_size=2, class_images=class_images)[0]
    call = training_calls[-1]
    assert (call["seed"], call["batch_size"], call["steps"], call["start_step"]) == (7, 2, 1, 0)
    assert call["data"].prior_latents.shape[:2] == (2, 3)  # each class image in the three branches
    assert call["backend"].dtype == torch.float32
    assert (concept.metadata["class_images"], concept.metadata["seed"], concept.metadata["batch_size"]) == (2, 7, 2)
    assert (concept.metadata["learning_rate"], concept.metadata["preset"], concept.metadata["steps"]) == \
        (1e-3, "official", 1)
    base_fingerprint = pack_module("nodes.comfyui.weights").base_fingerprint
    assert concept.metadata["base_model_hash"] == base_fingerprint(tiny[0])
    run_trainer(registered_nodes, tiny, steps=1, precision="bf16")
    assert training_calls[-1]["backend"].dtype == torch.bfloat16 and training_calls[-1]["data"].prior_latents is None


def test_progress_counts_the_steps_and_starts_where_a_resumed_run_starts(registered_nodes, tiny):
    with progress_reports() as reports:
        half = run_trainer(registered_nodes, tiny, steps=2)[0]
    assert reports == [(0, 2), (1, 2), (2, 2)]
    with progress_reports() as reports:
        run_trainer(registered_nodes, tiny, steps=3, resume_from=half)
    assert reports == [(2, 3), (3, 3)]


def test_saved_concept_loads_in_the_inference_nodes(registered_nodes, tiny, tmp_path):
    import folder_paths
    import nodes
    from safetensors.torch import load_file

    concept = run_trainer(registered_nodes, tiny, steps=1)[0]
    name = registered_nodes["EqDiffSaveConcept"].execute(concept, "unit_saved", False, True, False).args[0]
    folder = folder_paths.get_folder_paths("eqdiff")[0]
    path = os.path.join(folder, name)
    try:
        emb_path = os.path.join(folder_paths.get_folder_paths("embeddings")[0], name)
        emb = load_file(emb_path)["clip_l"]
        loaded = registered_nodes["EqDiffLoadConcept"].execute(name).args[0]
        assert torch.equal(emb[0], loaded.token_lf + loaded.token_hf)  # S*_ori = S*_LF + S*_HF
        assert not loaded.training_state  # not kept unless asked
        assert torch.equal(loaded.token_lf, concept.token_lf) and loaded.metadata["class_word"] == "dog"
        model, clip, _ = tiny
        _, c_clip, token = registered_nodes["EqDiffApplyConcept"].execute(model, clip, loaded, 1.0, "").args
        assert token == "<unit>"
        by_token = nodes.CLIPTextEncode().encode(c_clip, f"a {token} dog")[0][0][0]
        by_embedding = nodes.CLIPTextEncode().encode(clip, f"a embedding:{name[:-12]} dog")[0][0][0]
        assert torch.allclose(by_token, by_embedding, atol=1e-5)
        # a second save does not overwrite
        again = registered_nodes["EqDiffSaveConcept"].execute(concept, "unit_saved", False, False, False).args[0]
        assert again == "unit_saved_001.safetensors"
        os.remove(os.path.join(folder, again))
    finally:
        os.remove(path)
        os.remove(emb_path)


def test_save_concept_overwrites_only_when_asked_and_load_concept_sees_the_new_file(registered_nodes, tiny):
    import dataclasses

    import folder_paths
    from safetensors.torch import load_file

    save, load = registered_nodes["EqDiffSaveConcept"], registered_nodes["EqDiffLoadConcept"]
    first = run_trainer(registered_nodes, tiny, steps=1)[0]
    second = dataclasses.replace(first, token_lf=first.token_lf + 1.0)
    concepts, embeddings = folder_paths.get_folder_paths("eqdiff")[0], folder_paths.get_folder_paths("embeddings")[0]
    concept_file, concept_001 = (os.path.join(concepts, f"unit_over{s}.safetensors") for s in ("", "_001"))
    embedding, embedding_001 = (os.path.join(embeddings, f"unit_over{s}.safetensors") for s in ("", "_001"))
    try:
        assert save.execute(first, "unit_over", False, True, False).args[0] == "unit_over.safetensors"
        os.utime(concept_file, (1, 1))  # so that the rewrite's time differs at any clock resolution
        stamp = load.fingerprint_inputs("unit_over.safetensors")
        assert save.execute(second, "unit_over", True, True, False).args[0] == "unit_over.safetensors"
        assert not os.path.exists(concept_001) and not os.path.exists(embedding_001)
        assert torch.equal(load.execute("unit_over.safetensors").args[0].token_lf, second.token_lf)
        assert torch.equal(load_file(embedding)["clip_l"][0], second.token_ori)
        assert load.fingerprint_inputs("unit_over.safetensors") != stamp  # ComfyUI reloads the file
        # without overwrite: a new name for both files, the existing ones left as they are
        assert save.execute(first, "unit_over", False, True, False).args[0] == "unit_over_001.safetensors"
        assert torch.equal(load_file(embedding)["clip_l"][0], second.token_ori)
        assert torch.equal(load_file(embedding_001)["clip_l"][0], first.token_ori)
    finally:
        for path in (concept_file, concept_001, embedding, embedding_001):
            if os.path.exists(path):
                os.remove(path)
    assert load.fingerprint_inputs("unit_over.safetensors") is None
    refusal = "name: '../x' must start with a letter or digit and hold only letters, digits, _ . -"
    assert save.validate_inputs(name="../x") == refusal
    with pytest.raises(ValueError) as raised:
        save.execute(first, "../x", False, False, False)
    assert str(raised.value) == refusal


def test_bad_inputs_get_clear_errors(registered_nodes, tiny, tiny_shapes):
    from concept_factory import random_concept

    images, masks = photos()
    with pytest.raises(ValueError, match="masks: 2 masks for 3 photos"):
        run_trainer(registered_nodes, tiny, photos=(images, masks[:2]))
    empty = masks.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="mask of photo 2 is empty"):
        run_trainer(registered_nodes, tiny, photos=(images, empty))
    with pytest.raises(ValueError, match="learning_rate: must be positive"):
        run_trainer(registered_nodes, tiny, learning_rate=0.0)
    with pytest.raises(ValueError, match="class_word"):
        run_trainer(registered_nodes, tiny, class_word="  ")
    assert "name: 'bad name' must start" in registered_nodes["EqDiffFDTETrainer"].validate_inputs(name="bad name")
    with pytest.raises(ValueError, match="precision: 'fp8' is not one of bf16, fp32"):
        run_trainer(registered_nodes, tiny, precision="fp8")
    with pytest.raises(ValueError, match="steps: 0 trains nothing"):
        run_trainer(registered_nodes, tiny, steps=0)
    other_clip = random_concept(*tiny_shapes, token_dim=512)  # a concept of another checkpoint
    with pytest.raises(ValueError, match="concept 'testconcept' has 512-d token embeddings"):
        run_trainer(registered_nodes, tiny, steps=1, resume_from=other_clip)
    with pytest.raises(ValueError, match="concept 'testconcept' has 512-d token embeddings"):
        run_trainer(registered_nodes, tiny, steps=1, options={"resolution": SIZE, "purecc_weight": 1.0},
                    purecc_stage1=other_clip)
    one = run_trainer(registered_nodes, tiny, steps=1, photos=photos(1))[0]  # documented: its own reference
    assert one.metadata["photos"] == 1
    image, mask = photos(1)
    flat = run_trainer(registered_nodes, tiny, steps=1, photos=(image, mask[0]))[0]  # a (H, W) MASK
    assert flat.metadata["photos"] == 1


def test_nan_loss_keeps_the_last_good_state(registered_nodes, tiny):
    import folder_paths

    from eqdiff_core import concept as concept_io

    autosave = os.path.join(folder_paths.get_folder_paths("eqdiff")[0], "unit.autosave.safetensors")
    with pytest.raises(ValueError, match=r"learning_rate: the loss became NaN or infinite at step (\d+)") as err:
        run_trainer(registered_nodes, tiny, steps=6, learning_rate=1e30)
    try:
        saved = concept_io.load(autosave)  # validates: every tensor finite
        import re

        bad_step = int(re.search(r"at step (\d+)", str(err.value)).group(1)) - 1
        assert saved.metadata["training_step"] == bad_step >= 1
        good = run_trainer(registered_nodes, tiny, steps=bad_step, learning_rate=1e30)[0]
        assert torch.equal(saved.token_lf, good.token_lf)
    finally:
        os.remove(autosave)


def test_interruption_saves_the_last_state(registered_nodes, tiny):
    import comfy.model_management
    import folder_paths

    from eqdiff_core import concept as concept_io

    def stop(value, total):
        if value >= 1:
            comfy.model_management.interrupt_current_processing(True)

    autosave = os.path.join(folder_paths.get_folder_paths("eqdiff")[0], "unit.autosave.safetensors")
    try:
        with progress_reports(stop), pytest.raises(comfy.model_management.InterruptProcessingException):
            run_trainer(registered_nodes, tiny, steps=4)
        saved = concept_io.load(autosave)
        assert saved.metadata["training_step"] == 1 and saved.training_state
        resumed = run_trainer(registered_nodes, tiny, steps=2, resume_from=saved)[0]
        assert resumed.metadata["training_step"] == 2 and len(resumed.metadata["loss_history"]) == 2
    finally:
        comfy.model_management.interrupt_current_processing(False)
        if os.path.exists(autosave):
            os.remove(autosave)


def test_bf16_mixed_precision_trains(registered_nodes, tiny):
    """The bf16 path (autocast over bf16 copies, fp32 trained tensors) on the CPU; CUDA runs the same code."""
    concept = run_trainer(registered_nodes, tiny, steps=2, precision="bf16")[0]
    assert concept.token_lf.dtype == torch.float32 and all(torch.isfinite(t).all() for t in concept.tensors().values())
    assert concept.metadata["precision"] == "bf16" and len(concept.metadata["loss_history"]) == 2


def test_trainer_options_override_only_what_is_set(registered_nodes, pack):
    _, training = pack
    node = registered_nodes["EqDiffTrainerOptions"]
    inputs = {i.id: i.default for i in node.define_schema().inputs}
    assert node.execute(**inputs).args[0] == {}  # everything at "preset", -1 or empty
    changed = {**inputs, "train_rra": "off", "mask_noise": "on", "p_low": 0.3, "dilate_iterations": 2,
               "filter_shape": "circle", "prompt_template": "a {token} {class_word}"}
    overrides = node.execute(**changed).args[0]
    assert overrides == {"train_rra": False, "mask_noise": True, "p_low": 0.3, "dilate_iterations": 2,
                         "filter_shape": "circle", "prompt_template": "a {token} {class_word}"}
    settings = training.settings_for("paper", **overrides)
    assert settings.train_rra is False and settings.filter_shape == "circle" and settings.p_high == 0.1
    for name, bad in (("resolution", 100), ("prompt_template", "no token here"), ("filter_profile", "triangle")):
        with pytest.raises(ValueError, match=name):
            node.execute(**{**inputs, name: bad})


def test_the_trainable_copy_holds_the_weights_the_model_computes_with(tiny, pack, tiny_shapes):
    """Whether ComfyUI merges weight patches into its modules (0.3.75 on a full load) or applies them on
    the fly (low-VRAM loading here; Dynamic VRAM on NVIDIA GPUs), the copy holds base + patches. The
    low-VRAM load stands in for Dynamic VRAM, which ComfyUI never enables on a CPU."""
    import comfy.model_management

    comfy_training, _ = pack
    weights = pack_module("nodes.comfyui.weights")
    model = tiny[0]
    key = next(k for k in tiny_shapes[0] if k.endswith("attn2.to_k.weight"))
    # unloaded first: a model an earlier test left loaded holds its patches merged into the weights
    comfy.model_management.unload_all_models()
    base = model.model_state_dict()[key].float().clone()
    patched = model.clone()
    patched.add_patches({key: (torch.full(base.shape, 0.125),)}, 2.0)
    try:
        patched.patch_model(torch.device("cpu"), lowvram_model_memory=1)  # patches applied per call, not merged
        module_weight = patched.get_model_object("diffusion_model").get_parameter(key[len("diffusion_model."):])
        assert torch.equal(module_weight.float(), base), "the low-VRAM load merged the patch; the test needs it apart"
        with torch.inference_mode(False):
            private = comfy_training.trainable_copy(patched.get_model_object("diffusion_model"),
                                                    weights.patched_weights(patched, "diffusion_model."), torch.float32)
        copied = private.get_parameter(key[len("diffusion_model."):])
        assert torch.allclose(copied, base + 0.25, atol=1e-6)
        assert not private.get_submodule(key[len("diffusion_model."):-len(".weight")]).comfy_cast_weights
    finally:
        patched.unpatch_model()
        comfy.model_management.unload_all_models()


def test_save_every_keep_training_state_and_resume_without_it(registered_nodes, tiny):
    """save_every: an autosave after every k-th step but the last, with the state of that step;
    Save Concept keeps the optimiser state only when asked; a concept without it resumes from its
    tensors with fresh moments at step 0 (a new run from there: its history goes on after the old)."""
    import folder_paths
    from safetensors.torch import load_file

    from eqdiff_core import concept as concept_io

    folder = folder_paths.get_folder_paths("eqdiff")[0]
    autosave = os.path.join(folder, "unit.autosave.safetensors")
    if os.path.exists(autosave):
        os.remove(autosave)
    saved_paths = []
    try:
        final = run_trainer(registered_nodes, tiny, steps=4, save_every=2)[0]
        auto = concept_io.load(autosave)
        assert auto.metadata["training_step"] == 2 and auto.training_state  # not again at the last step, 4
        assert auto.metadata["loss_history"] == pytest.approx(final.metadata["loss_history"][:2], rel=1e-6)
        save = registered_nodes["EqDiffSaveConcept"]
        for keep in (True, False):
            name = save.execute(final, f"unit_keep_{keep}", False, False, keep).args[0]
            saved_paths.append(os.path.join(folder, name))
            keys = load_file(saved_paths[-1]).keys()
            assert any(k.startswith("train.") for k in keys) == keep, keep
        cold = concept_io.load(saved_paths[-1])
        resumed = run_trainer(registered_nodes, tiny, steps=2, resume_from=cold)[0]
        history = resumed.metadata["loss_history"]
        assert resumed.metadata["training_step"] == 2 and len(history) == 6
        assert history[:4] == pytest.approx(final.metadata["loss_history"], rel=1e-6)
        assert history[4] != pytest.approx(final.metadata["loss_history"][0], rel=1e-4)  # other parameters
    finally:
        for path in [autosave, *saved_paths]:
            if os.path.exists(path):
                os.remove(path)
