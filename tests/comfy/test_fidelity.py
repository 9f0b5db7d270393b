"""The ``official`` preset against the authors' run (eqdiff-method.md), term by term, on the tiny model:
the initial embedding, the start-token detach, the class and reference prompts, the placeholder's
cross-attention map, and at inference the reference rows each CFG branch reads and the weights of the
reference pass. Every expected value is computed independently of the code under test."""

import json

import pytest
import torch

import nodes
from comfy_env import COMFY_DIR, pack_module, use_comfy
from concept_factory import random_concept

use_comfy()
SIZE = 64


def photos(n=3):
    images = torch.rand(n, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(n, SIZE, SIZE)
    masks[:, 16:48, 20:44] = 1.0
    return images, masks


@pytest.fixture(scope="module")
def pack(registered_nodes):
    return pack_module("nodes.comfyui.training"), pack_module("eqdiff_core.training")


@pytest.fixture(scope="module")
def backend(tiny, pack):
    comfy_training, training = pack
    model, clip, _ = tiny
    settings = training.settings_for("official", resolution=SIZE)
    with torch.inference_mode(False):
        params = comfy_training.initial_parameters(model, clip, settings)
        for layer in params.rra.values():
            with torch.no_grad():
                layer.h_r.bias[-1] = 0.5  # gates open: RRA and its maps are on the path
        return comfy_training.TrainingBackend(model, clip, params, settings, token="<unit>", class_word="dog",
                                              dtype=torch.float32, gradient_checkpointing=False)


def encode(clip, text):
    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, text)[0][0][0]


def test_embeddings_start_from_the_vocabulary_entry_ktn(tiny, backend):
    """The authors' initializer lookup bypasses BPE: the vocabulary entry 'ktn' (id 42170 in CLIP's
    vocab.json), not the first BPE piece 'k' of the word."""
    vocab = json.loads((COMFY_DIR / "comfy" / "sd1_tokenizer" / "vocab.json").read_text())
    assert vocab["ktn"] == 42170
    table = tiny[1].cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    params = backend.params
    assert torch.equal(params.token_lf.detach(), table[42170].float()) and torch.equal(params.token_hf.detach(),
                                                                                       table[42170].float())
    assert not torch.equal(params.token_lf.detach(), table[vocab["k"]].float())


def test_class_and_reference_prompts_are_the_authors(tiny, backend):
    """Class images: the class word alone (train.sh's INIT_TOKEN). The photos' reference pass: the
    instance prompt with the placeholder at its initial, untrained row."""
    _, clip, _ = tiny
    assert torch.allclose(backend.class_context()[0].cpu(), encode(clip, "dog").float(), atol=1e-5)
    tokens = pack_module("nodes.comfyui.tokens")
    init = tokens.vocabulary_row(clip, "ktn")
    with_init = tokens.with_concept_tokens(clip, {"<unit>": init})
    assert torch.allclose(backend.reference_context()[0].cpu(), encode(with_init, "photo of a <unit> dog").float(),
                          atol=1e-5)


def test_the_start_tokens_keys_and_values_pass_no_gradient(backend):
    """Custom Diffusion's convention, kept by the authors' processor: detach[:, :1] on K and V."""
    projection = next(m for m in backend.unet.modules() if type(m).__name__ == "DeltaProjection")
    context = torch.randn(2, 77, projection.base.weight.shape[1])
    with torch.inference_mode(False):
        delta = backend.params.kv_delta(projection.key)
        for row, expect_grad in ((0, False), (1, True)):
            delta.grad = None
            projection(context)[:, row].sum().backward()
            assert (delta.grad is not None and float(delta.grad.abs().max()) > 0) == expect_grad, row
        delta.grad = None


def test_the_placeholders_cross_attention_map_holds_only_token_maps(backend):
    """The map behind the cross-attention loss is the placeholder's attention in the loss layers, averaged
    over heads and layers; the RRA gates recorded in the same pass must not enter it. Expected value:
    softmax(q k^T / sqrt(d)) of each loss layer's own q and k, recorded by hooks on its projections."""
    params = backend.params
    layers = [m for name, m in backend.unet.named_modules()
              if name.endswith("attn2") and any(name.startswith(l.prefix) for l in backend.token_layers)]
    assert len(layers) == len(backend.token_layers)
    seen = []
    hooks = [(layer.to_q.register_forward_hook(lambda m, i, o: seen.append(("q", o.detach()))),
              layer.to_k.register_forward_hook(lambda m, i, o: seen.append(("k", o.detach())))) for layer in layers]
    with torch.inference_mode(False), torch.no_grad():
        x = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([400, 400])
        bank = backend.reference_features(x, t, backend.reference_context().expand(2, -1, -1))
        seen.clear()
        context = backend.instance_context((params.token_lf + params.token_hf).detach()[None].expand(2, -1))
        out = backend.predict(x, t, context, bank, recorded_rows=2)
    for q_hook, k_hook in hooks:
        q_hook.remove()
        k_hook.remove()
    qs, ks = [v for kind, v in seen if kind == "q"], [v for kind, v in seen if kind == "k"]
    heads = layers[0].heads
    maps = []
    for q, k in zip(qs, ks):
        d = q.shape[-1] // heads
        qh = q.reshape(2, -1, heads, d).transpose(1, 2)
        kh = k.reshape(2, -1, heads, d).transpose(1, 2)
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / d**0.5, dim=-1)
        maps.append(probs.mean(1)[:, :, backend.placeholder_index])
    assert out.token_attention is not None
    assert torch.allclose(out.token_attention, torch.stack(maps).mean(0), atol=1e-5)


# -- inference: the reference rows of each CFG branch and the weights of the reference pass --------
@pytest.fixture(scope="module")
def applied(tiny, tiny_shapes, registered_nodes):
    model, clip, vae = tiny
    concept = random_concept(*tiny_shapes, gate=0.6, seed=3)
    with torch.inference_mode():
        m, c, _ = registered_nodes["EqDiffApplyConcept"].execute(model, clip, concept, 1.0, "").args
    return model, m, c, vae, concept


RRA = dict(strength=1.0, start_percent=0.0, end_percent=1.0, reference_noise="clean", noise_seed=0,
           rows="cond_uncond", layers="middle+output")


def rra_patch(registered_nodes, model, concept, vae, **overrides):
    reference = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return registered_nodes["EqDiffRRAPatch"].execute(model=model, concept=concept, reference=reference, vae=vae,
                                                          **{**RRA, "cache": True, **overrides}).args[0]


def sample(model, clip, negative=""):
    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(clip, "a photo of <testconcept> dog")[0]
        neg = nodes.CLIPTextEncode().encode(clip, negative)[0]
        latent = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
        return nodes.common_ksampler(model, 1, 2, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]


def first_bank(model):
    """The reference features of the first step (the feature cache's first entry)."""
    attention = model.model_options["transformer_options"]["patches_replace"]["attn1"]
    owner = next(iter(attention.values())).owner
    return next(iter(owner.cache._entries.values()))


def test_each_cfg_branch_reads_its_own_reference_row(applied, registered_nodes):
    """per_branch (the authors): the reference pass has a row with the reference text for the
    conditional branch and one with the negative prompt for the unconditional branch; shared: one row."""
    import comfy.patcher_extension

    base, m, c, vae, concept = applied
    calls = []

    def inner(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        calls.append((x.shape[0], c_crossattn.clone(), list(transformer_options.get("cond_or_uncond", []))))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    negative = encode(c, "blurry").float()
    for contexts, rows in (("per_branch", 2), ("shared", 1)):
        patched = rra_patch(registered_nodes, m, concept, vae, reference_contexts=contexts, cache=False).clone()
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_inner", inner)
        calls.clear()
        sample(patched, c, negative="blurry")
        reference_calls = [call for call in calls if call[0] == rows and call[2] == [0] * rows]
        assert reference_calls, calls  # a foreign wrapper inside ours: the reference rows get a call of their own
        context = reference_calls[0][1].float()
        assert torch.allclose(context[0], concept.reference_context.float(), atol=1e-6)
        if rows == 2:
            assert torch.allclose(context[1], negative, atol=1e-6)


def test_the_reference_pass_sees_the_base_weights(applied, registered_nodes):
    """reference_weights base (the authors' frozen base UNet): the reference features of the MODEL with
    the concept's K/V equal those of the checkpoint without them; through the MODEL they differ."""
    base, m, c, vae, concept = applied
    with_base = rra_patch(registered_nodes, m, concept, vae, reference_weights="base")
    plain_base = rra_patch(registered_nodes, base, concept, vae, reference_weights="model")
    through_model = rra_patch(registered_nodes, m, concept, vae, reference_weights="model")
    for patched in (with_base, plain_base, through_model):
        sample(patched, c)
    a, b, other = first_bank(with_base), first_bank(plain_base), first_bank(through_model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4), key
    assert any(not torch.allclose(a[k], other[k], atol=1e-4) for k in a)
