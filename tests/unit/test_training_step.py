"""One training step of eqdiff_core.training on a small stand-in of its DiffusionBackend protocol.

The stand-in is a few tensor operations with the protocol's shapes (text contexts, a reference pass,
a noise prediction with attention maps), so the step's logic is pinned at unit-test speed; the real
UNet runs behind the same protocol in tests/comfy/test_training.py. Expected values are computed
here by hand from the authors' formulas (eqdiff-method.md §3.2, §5.2, §5.3), with numpy loops.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from eqdiff_core import rra, training

D, L, PLACEHOLDER, H = 8, 5, 2, 8   # text width, prompt length, placeholder position, latent side


class StandIn:
    """The model as the step sees it: contexts, the reference pass and the prediction, with every call
    recorded. The prediction depends on the latent, the context (so the embeddings get gradients) and
    the reference features; the maps are softmaxes of fixed features."""

    def __init__(self, timesteps: int = 1000, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.alphas_cumprod = torch.linspace(0.9991, 0.0047, timesteps)
        self.template = torch.randn(1, L, D, generator=g)
        self._class = torch.randn(1, L, D, generator=g)
        self._reference = torch.randn(1, L, D, generator=g)
        self.mix = torch.randn(D, 4, generator=g) * 0.1
        self.calls: dict[str, list] = {"reference": [], "predict": []}

    def instance_context(self, embeddings):
        rows = self.template.expand(embeddings.shape[0], -1, -1).clone()
        rows[:, PLACEHOLDER] = embeddings
        return rows

    def class_context(self):
        return self._class

    def reference_context(self):
        return self._reference

    def reference_features(self, x, timesteps, context):
        self.calls["reference"].append((x.clone(), timesteps.clone(), context.clone()))
        return {"features": x.flatten(2).transpose(1, 2)}  # (R, h*w, 4)

    def predict(self, x, timesteps, context, reference, recorded_rows):
        self.calls["predict"].append((x.clone(), timesteps.clone(), context.detach().clone(), recorded_rows))
        shift = (context.mean(1) @ self.mix)[:, :, None, None]                 # (B, 4, 1, 1)
        noise = 0.5 * x + shift
        token, ref_attention = None, None
        if recorded_rows:
            q = x[:recorded_rows].flatten(2).transpose(1, 2)                    # (b, N, 4)
            token = torch.softmax((q * context[:recorded_rows, PLACEHOLDER, :4][:, None]).sum(-1), -1)
            if reference is not None:
                k = reference["features"][:recorded_rows]
                ref_attention = torch.softmax(q @ k.transpose(1, 2), -1)       # (b, N, M)
        return training.StepOutput(noise, ref_attention, token)


class ThroughWeights(StandIn):
    """The stand-in whose prediction also reads the trained K/V delta, as the UNet's does, so that a clipped
    tensor gets a gradient. ``broken`` adds sqrt(u - u) = 0, whose gradient 1 / (2 sqrt 0) is infinite,
    through the text context (the embeddings) or through the K/V delta: a finite loss, a non-finite gradient."""

    def __init__(self, p: training.ConceptParameters, broken: str | None = None):
        super().__init__()
        self.p, self.broken = p, broken

    def predict(self, x, timesteps, context, reference, recorded_rows):
        out = super().predict(x, timesteps, context, reference, recorded_rows)
        kv = self.p.kv_delta("kv")
        out.noise = out.noise + kv.mean()
        if self.broken:
            u = context if self.broken == "embeddings" else kv
            out.noise = out.noise + torch.sqrt(u - u.detach()).sum()
        return out


def data(photos=3, priors=0, seed=1) -> training.TrainingData:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(3, photos, 4, H, H, generator=g)
    masks = torch.zeros(photos, 1, H, H)
    masks[:, :, 2:6, 1:7] = 1.0
    dilated = torch.zeros_like(masks)
    dilated[:, :, 1:7, 0:8] = 1.0
    prior = torch.randn(priors, 3, 4, H, H, generator=g) if priors else None
    return training.TrainingData(latents, dilated, masks, torch.zeros(4, H, H), prior)


def params(rra_layers=True) -> training.ConceptParameters:
    g = torch.Generator().manual_seed(2)
    to_k, to_v = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    layers = {"output.3.0": rra.RRALayer.from_self_attention(to_k, to_v)} if rra_layers else {}
    return training.ConceptParameters(torch.randn(D, generator=g), torch.randn(D, generator=g),
                                      {"kv": torch.zeros(3, 3)}, layers)


def settings(**overrides) -> training.TrainingSettings:
    return training.settings_for("official", **overrides)


# -- the parts of a step, one at a time ------------------------------------------------------------
def test_draw_batch_photos_priors_and_branches():
    d = data(photos=3, priors=5)
    batch = training.draw_batch(d, settings(), 2, torch.Generator().manual_seed(0))
    assert batch.size == 2 and batch.rows == 4 and len(set(batch.photos.tolist())) == 2  # no repeats while possible
    assert batch.priors.numel() == 2 and batch.priors.max() < 5
    many = training.draw_batch(d, settings(), 7, torch.Generator().manual_seed(0))  # more than the photos
    assert many.size == 7 and many.photos.max() < 3
    plain = training.draw_batch(d, settings(branches_on_prior=False, p_low=1.0, p_high=0.0, p_original=0.0), 2,
                                torch.Generator().manual_seed(0))
    assert plain.branches.tolist() == [training.LOW] * 2 and plain.prior_branches.tolist() == [training.ORIGINAL] * 2
    drawn = training.draw_batch(d, settings(p_low=1.0, p_high=0.0, p_original=0.0), 2, torch.Generator().manual_seed(0))
    assert drawn.prior_branches.tolist() == [training.LOW] * 2  # the authors draw branches for class images too
    no_prior = training.draw_batch(d, settings(prior_loss_weight=0.0), 2, torch.Generator().manual_seed(0))
    assert no_prior.priors.numel() == 0 and no_prior.priors.dtype == torch.long  # an (empty) index tensor


def test_draw_batch_replayed_by_hand():
    """The draws in order from the step's stream: the photos without repeats (randperm) while the batch fits in
    them, up to all N of them, with repeats past that (uniform over [0, N)); the class images uniform over [0, P)."""
    d = data(photos=3, priors=5)
    for size in (2, 3, 7):
        batch = training.draw_batch(d, settings(), size, torch.Generator().manual_seed(9))
        g = torch.Generator().manual_seed(9)
        photos = torch.randperm(3, generator=g)[:size] if size <= 3 else torch.randint(0, 3, (size,), generator=g)
        assert torch.equal(batch.photos, photos), size
        assert torch.equal(batch.priors, torch.randint(0, 5, (size,), generator=g)), size


def test_batch_latents_pick_each_samples_branch_and_mask():
    d = data(photos=3, priors=2)
    batch = training.Batch(torch.tensor([2, 0]), torch.tensor([training.HIGH, training.ORIGINAL]),
                           torch.tensor([1]), torch.tensor([training.LOW]))
    z0, masks = training.batch_latents(d, batch)
    assert torch.equal(z0[0], d.latents[training.HIGH, 2]) and torch.equal(z0[1], d.latents[training.ORIGINAL, 0])
    assert torch.equal(z0[2], d.prior_latents[1, training.LOW])
    assert torch.equal(masks[0], d.loss_masks[2]) and masks[2].min() == 1  # class images: the whole image


@pytest.mark.parametrize("mask_noise", [True, False])
def test_masked_noising_is_eq6(mask_noise):
    d = data()
    z0, masks = d.latents[training.ORIGINAL, :2], d.loss_masks[:2]
    schedule = torch.linspace(0.99, 0.01, 1000)
    t, noise, z_t = training.masked_noising(z0, masks, schedule, settings(mask_noise=mask_noise),
                                            torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)  # the same draws, by hand
    t_hand = torch.randint(0, 1000, (2,), generator=g)
    noise_hand = torch.randn(z0.shape, generator=g)
    assert torch.equal(t, t_hand) and torch.equal(noise, noise_hand)
    a = schedule[t].view(-1, 1, 1, 1)
    noised = a.sqrt() * z0 + (1 - a).sqrt() * noise_hand
    want = masks * noised + (1 - masks) * z0 if mask_noise else noised
    assert torch.allclose(z_t, want, atol=1e-6)


def test_masked_noising_returns_on_the_latents_dtype_and_device():
    """The noise in the latents' dtype (float64 here), everything on their device: meta stands for an
    accelerator (a device other than the CPU's, shapes without data)."""
    d = data()
    z0, masks = d.latents[training.ORIGINAL, :2].double(), d.loss_masks[:2].double()
    schedule = torch.linspace(0.99, 0.01, 1000)
    _, noise, z_t = training.masked_noising(z0, masks, schedule, settings(), torch.Generator().manual_seed(4))
    assert noise.dtype == z_t.dtype == torch.float64
    t, noise, z_t = training.masked_noising(z0.to("meta"), masks.to("meta"), schedule.to("meta"), settings(),
                                            torch.Generator().manual_seed(4))
    assert t.device.type == noise.device.type == z_t.device.type == "meta"


def test_reference_pass_is_another_photo_at_t_minus_offset_with_the_same_noise():
    d, backend = data(photos=3, priors=2), StandIn()
    batch = training.Batch(torch.tensor([0, 1]), torch.tensor([2, 2]), torch.tensor([0]), torch.tensor([2]))
    t = torch.tensor([10, 1, 500])
    noise = torch.randn(3, 4, H, H, generator=torch.Generator().manual_seed(5))
    s = settings(reference_augment=False, reference_timestep_offset=2)
    features, ref_masks = training.reference_pass(backend, d, batch, t, noise, s, torch.Generator().manual_seed(6))
    x, ref_t, context = backend.calls["reference"][0]
    assert ref_t.tolist() == [8, 0, 498]  # t - 2, clamped at 0
    g = torch.Generator().manual_seed(6)  # which other photo each one takes
    others = [[1, 2][int(torch.randint(0, 2, (1,), generator=g))], [0, 2][int(torch.randint(0, 2, (1,), generator=g))]]
    refs = torch.stack([d.latents[training.ORIGINAL, others[0]], d.latents[training.ORIGINAL, others[1]],
                        d.prior_latents[0, training.ORIGINAL]])
    a = backend.alphas_cumprod[ref_t].view(-1, 1, 1, 1)
    assert torch.allclose(x, a.sqrt() * refs + (1 - a).sqrt() * noise, atol=1e-6)
    assert torch.equal(ref_masks, d.subject_masks[others])
    # the photos' references read the reference context, the class image's the class prompt
    assert torch.equal(context[:2], backend.reference_context().expand(2, -1, -1))
    assert torch.equal(context[2:], backend.class_context())
    assert torch.equal(features["features"], x.flatten(2).transpose(1, 2))


def test_one_photo_is_its_own_reference():
    d, backend = data(photos=1), StandIn()
    batch = training.Batch(torch.tensor([0]), torch.tensor([2]), torch.zeros(0, dtype=torch.long),
                           torch.zeros(0, dtype=torch.long))
    training.reference_pass(backend, d, batch, torch.tensor([5]), torch.zeros(1, 4, H, H),
                            settings(reference_augment=False, reference_timestep_offset=0), torch.Generator())
    a = backend.alphas_cumprod[5]
    assert torch.allclose(backend.calls["reference"][0][0], a.sqrt() * d.latents[training.ORIGINAL, :1], atol=1e-6)


def test_class_images_reference_is_their_own_augmented_copy_flipped_at_random():
    """Replayed by hand from the stream: the one photo is its own reference (one draw over [0, 1)), augmented;
    then each class image's own ORIGINAL latent, augmented with the random flip, its mask all ones."""
    d = data(photos=1, priors=2)
    batch = training.Batch(torch.tensor([0]), torch.tensor([2]), torch.tensor([1, 0]), torch.tensor([2, 2]))
    latents, masks = training.reference_latents(d, batch, settings(), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    assert int(torch.randint(0, 1, (1,), generator=g)) == 0
    photo, mask = training.augment_reference(d.latents[training.ORIGINAL, 0], d.subject_masks[0], d.canvas, g)
    assert torch.equal(latents[0], photo) and torch.equal(masks, mask[None])
    flipped = []
    for row, j in enumerate([1, 0], start=1):
        unflipped, _ = training.augment_reference(d.prior_latents[j, training.ORIGINAL], torch.ones(1, H, H), d.canvas,
                                                  torch.Generator().set_state(g.get_state()))
        want, _ = training.augment_reference(d.prior_latents[j, training.ORIGINAL], torch.ones(1, H, H), d.canvas, g,
                                             flip=True)
        assert torch.equal(latents[row], want), j
        flipped.append(not torch.equal(want, unflipped))
    assert any(flipped)  # this seed flips one of them at least


def test_text_context_puts_each_branchs_embedding_at_the_placeholder():
    backend, p = StandIn(), params()
    batch = training.Batch(torch.tensor([0, 1, 2]), torch.tensor([training.HIGH, training.ORIGINAL, training.LOW]),
                           torch.tensor([0]), torch.tensor([training.ORIGINAL]))
    context = training.text_context(p, backend, batch)
    want = [p.token_hf, p.token_lf + p.token_hf, p.token_lf]
    for row, vector in enumerate(want):
        assert torch.allclose(context[row, PLACEHOLDER], vector)
        assert torch.equal(context[row, :PLACEHOLDER], backend.template[0, :PLACEHOLDER])
    assert torch.equal(context[3], backend.class_context()[0])
    backend._class = backend._class.double()  # a class prompt encoded in another dtype joins at the rows' dtype
    context = training.text_context(p, backend, batch)
    assert context.dtype == torch.float32 and torch.equal(context[3], backend.class_context()[0].float())


# -- the losses, by hand -------------------------------------------------------------------------------
def hand_losses(out, noise, masks, subject, ref_masks, b, s):
    """The authors' formulas, element by element (numpy)."""
    eps_hat, eps = out.noise.detach().double().numpy(), noise.double().numpy()
    m = masks.double().numpy()
    denoise = np.mean([np.sum(m[i] * (eps_hat[i] - eps[i]) ** 2) / np.sum(m[i]) for i in range(b)])  # train.py:1547
    prior = np.mean((eps_hat[b:] - eps[b:]) ** 2) if eps.shape[0] > b else 0.0

    def nearest(mask, side):  # 8 -> side by nearest neighbour, flattened
        step = mask.shape[-1] // side
        return mask[:, 0, ::step, ::step].reshape(mask.shape[0], -1)

    a = out.reference_attention.detach().double().numpy()
    side = int(math.isqrt(a.shape[1]))
    m_ref, m_gt = nearest(ref_masks.double().numpy(), side), nearest(subject.double().numpy(), side)
    share = np.einsum("bnm,bm->bn", a, m_ref)
    l_ra = np.mean((share * m_gt - m_gt) ** 2)                          # self_attention_loss.py:60
    tok = out.token_attention.detach().double().numpy()
    ca = np.mean((tok / tok.max(axis=1, keepdims=True) - m_gt) ** 2)     # train.py:1585-1593
    total = denoise + s.prior_loss_weight * prior + s.ra_loss_weight * l_ra + s.cross_attention_loss_weight * ca
    return total, denoise, prior, l_ra, ca


def test_losses_of_a_step_equal_the_authors_formulas():
    g = torch.Generator().manual_seed(7)
    b, rows, n = 2, 4, H * H
    out = training.StepOutput(torch.randn(rows, 4, H, H, generator=g),
                              torch.softmax(torch.randn(b, n, n, generator=g), -1),
                              torch.rand(b, n, generator=g))
    noise = torch.randn(rows, 4, H, H, generator=g)
    masks = (torch.rand(rows, 1, H, H, generator=g) > 0.3).float()
    masks[b:] = 1.0
    subject = (torch.rand(b, 1, H, H, generator=g) > 0.5).float()
    ref_masks = (torch.rand(b, 1, H, H, generator=g) > 0.5).float()
    batch = training.Batch(torch.tensor([0, 1]), torch.tensor([2, 2]), torch.tensor([0, 1]), torch.tensor([2, 2]))
    s = settings(prior_loss_weight=0.7)
    loss, parts = training.losses(out, noise, masks, subject, ref_masks, batch, s)
    total, denoise, prior, l_ra, ca = hand_losses(out, noise, masks, subject, ref_masks, b, s)
    assert float(parts.denoise) == pytest.approx(denoise, rel=1e-6)
    assert float(parts.prior) == pytest.approx(prior, rel=1e-6)
    assert float(parts.reference_attention) == pytest.approx(l_ra, rel=1e-5)
    assert float(parts.cross_attention) == pytest.approx(ca, rel=1e-5)
    assert float(loss) == pytest.approx(total, rel=1e-6) and float(parts.total) == float(loss)
    assert set(parts.values()) == {"loss", "denoise", "prior", "ra", "cross_attention"}
    unmasked, _ = training.losses(out, noise, masks, subject, ref_masks, batch, settings(masked_loss=False,
                                  ra_loss_weight=0.0, cross_attention_loss_weight=0.0, prior_loss_weight=0.0))
    everywhere = np.mean([np.sum((out.noise[i].double() - noise[i].double()).numpy() ** 2) / (H * H) for i in range(b)])
    assert float(unmasked) == pytest.approx(everywhere, rel=1e-6)  # masked_loss off: M = 1


def test_losses_follow_the_settings_normalisation_form_weights_and_map_sizes():
    """Eq. 7 per element ("elements": also divided by the 4 channels), L_ra in the paper's form (the norm of
    Eq. 10) on a reference map of another size than the target's (64 queries, 16 keys: the reference mask
    at 4x4, the subject at 8x8, both by nearest resizing); a term with weight 0 or without its map is off."""
    g = torch.Generator().manual_seed(12)
    b = 2
    out = training.StepOutput(torch.randn(b, 4, H, H, generator=g), torch.softmax(torch.randn(b, H * H, 16, generator=g), -1),
                              torch.rand(b, H * H, generator=g))
    noise = torch.randn(b, 4, H, H, generator=g)
    masks = (torch.rand(b, 1, H, H, generator=g) > 0.3).float()
    subject = (torch.rand(b, 1, H, H, generator=g) > 0.5).float()
    ref_masks = (torch.rand(b, 1, H, H, generator=g) > 0.5).float()
    none = torch.zeros(0, dtype=torch.long)
    batch = training.Batch(torch.tensor([0, 1]), torch.tensor([2, 2]), none, none)
    s = settings(ra_loss_form="paper", masked_loss_normalisation="elements", ra_loss_weight=0.3,
                 cross_attention_loss_weight=0.0)
    loss, parts = training.losses(out, noise, masks, subject, ref_masks, batch, s)
    eps_hat, eps, m = out.noise.double().numpy(), noise.double().numpy(), masks.double().numpy()
    denoise = np.mean([np.sum(m[i] * (eps_hat[i] - eps[i]) ** 2) / (4 * np.sum(m[i])) for i in range(b)])
    m_ref = ref_masks.double().numpy()[:, 0, ::2, ::2].reshape(b, -1)  # 8x8 -> 4x4 by nearest
    m_gt = subject.double().numpy().reshape(b, -1)
    share = np.einsum("bnm,bm->bn", out.reference_attention.double().numpy(), m_ref)
    l_ra = np.mean(np.linalg.norm(share - m_gt, axis=1))  # || sum_j (A * M^r)_ij - M^g ||_2 per sample
    assert float(parts.denoise) == pytest.approx(denoise, rel=1e-6)
    assert float(parts.reference_attention) == pytest.approx(l_ra, rel=1e-5)
    assert float(loss) == pytest.approx(denoise + 0.3 * l_ra, rel=1e-6)
    assert set(parts.values()) == {"loss", "denoise", "ra"}  # cross-attention weight 0: no term
    off, parts = training.losses(out, noise, masks, subject, ref_masks, batch,
                                 settings(ra_loss_weight=0.0, cross_attention_loss_weight=0.0))
    assert set(parts.values()) == {"loss", "denoise"} and torch.equal(off, parts.denoise)
    _, parts = training.losses(out, noise, masks, subject, None, batch, settings(cross_attention_loss_weight=0.0))
    assert set(parts.values()) == {"loss", "denoise"}  # no reference masks: no L_ra
    _, parts = training.losses(training.StepOutput(out.noise), noise, masks, subject, None, batch, settings())
    assert set(parts.values()) == {"loss", "denoise"}  # no maps recorded: neither term


def test_a_step_is_draw_noise_reference_context_predict_losses():
    """training_step wires the parts in the paper's order, on one random stream."""
    d, s = data(photos=3, priors=4), settings()
    p, backend, replay = params(), StandIn(), StandIn()
    loss, parts, batch = training.training_step(p, backend, d, s, 2, training.step_generator(3, 9))
    g = training.step_generator(3, 9)
    again = training.draw_batch(d, s, 2, g)
    assert torch.equal(again.photos, batch.photos) and torch.equal(again.branches, batch.branches)
    z0, masks = training.batch_latents(d, again)
    t, noise, z_t = training.masked_noising(z0, masks, replay.alphas_cumprod, s, g)
    reference, ref_masks = training.reference_pass(replay, d, again, t, noise, s, g)
    context = training.text_context(p, replay, again)
    out = replay.predict(z_t, t, context, reference, recorded_rows=2)
    want, _ = training.losses(out, noise, masks, d.subject_masks[again.photos], ref_masks, again, s)
    assert torch.equal(backend.calls["predict"][0][0], z_t) and backend.calls["predict"][0][3] == 2
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    loss.backward()
    assert p.token_lf.grad is not None or p.token_hf.grad is not None


def test_without_rra_there_is_no_reference_pass():
    backend = StandIn()
    _, parts, _ = training.training_step(params(rra_layers=False), backend, data(), settings(), 2,
                                         training.step_generator(0, 0))
    assert backend.calls["reference"] == [] and parts.reference_attention is None
    backend = StandIn()
    training.training_step(params(), backend, data(), settings(train_rra=False), 2, training.step_generator(0, 0))
    assert backend.calls["reference"] == []


# -- the loop ------------------------------------------------------------------------------------------
def test_train_clips_kv_and_rra_but_not_the_embeddings():
    p = params()
    for param in p.parameters():
        param.grad = None
    s = settings(max_grad_norm=1e-6, weight_decay=0.0)
    opt = training.make_optimizer(p, 0.5, s)
    before = {n: t.detach().clone() for n, t in p.named_parameters()}
    training.train(p, StandIn(), data(), s, opt, steps=1, batch_size=2, seed=0)
    moved = {n: float((t.detach() - before[n]).abs().max()) for n, t in p.named_parameters()}
    # Adam normalises the step, so clipping shows in the moments: the clipped grads are tiny
    assert opt.state[p.token_lf]["exp_avg"].abs().max() > 1e-4
    for name, param in p.named_parameters():
        if name.startswith("rra") and opt.state.get(param):
            assert opt.state[param]["exp_avg"].abs().max() < 1e-6, name
    assert moved["token_lf"] > 0


def test_weight_decay_pulls_every_trained_tensor():
    p, s = params(), settings(weight_decay=0.5)
    before = p.token_lf.detach().clone()
    opt = training.make_optimizer(p, 0.1, s)
    assert opt.param_groups[0]["weight_decay"] == 0.5
    for param in p.parameters():
        param.grad = torch.zeros_like(param)
    opt.step()
    assert torch.allclose(p.token_lf.detach(), before * (1 - 0.1 * 0.5))


def test_a_non_finite_loss_stops_before_the_update():
    class Broken(StandIn):
        def predict(self, *args, **kwargs):
            out = super().predict(*args, **kwargs)
            out.noise = out.noise * float("nan")
            return out

    p = params()
    opt = training.make_optimizer(p, 0.1, settings())
    before = {n: t.detach().clone() for n, t in p.named_parameters()}
    with pytest.raises(training.NonFiniteLoss) as err:
        training.train(p, Broken(), data(), settings(), opt, steps=3, batch_size=2, seed=0)
    assert err.value.step == 0 and str(err.value) == "the loss became NaN or infinite at step 0"
    assert all(torch.equal(t.detach(), before[n]) for n, t in p.named_parameters())
    assert all(t.grad is None for t in p.parameters())  # the non-finite gradients are dropped


@pytest.mark.parametrize("broken", ["embeddings", "kv"])
def test_a_non_finite_gradient_under_a_finite_loss_stops_before_the_update(broken):
    """An infinite gradient of the embeddings (not clipped, checked on their own) or of the K/V delta (in the
    clipped norm) stops the run like a non-finite loss."""
    p = params()
    opt = training.make_optimizer(p, 0.1, settings())
    before = {n: t.detach().clone() for n, t in p.named_parameters()}
    with pytest.raises(training.NonFiniteLoss) as err:
        training.train(p, ThroughWeights(p, broken), data(), settings(), opt, steps=2, batch_size=2, seed=0)
    assert err.value.step == 0
    assert all(torch.equal(t.detach(), before[n]) for n, t in p.named_parameters())


@pytest.mark.parametrize("max_norm", [1e-3, 0.0])
def test_train_clips_the_kv_gradient_to_max_grad_norm_and_zero_means_no_clipping(max_norm):
    """The K/V gradient after a step is the raw one (the step replayed and backpropagated by hand) times
    min(1, max_norm / (norm + 1e-6)), torch's clip_grad_norm_; max_grad_norm 0 leaves it whole. The stand-in
    reads no RRA layer, so the K/V delta is the only clipped tensor with a gradient; the embeddings are not clipped."""
    s = settings(max_grad_norm=max_norm)
    raw = params()
    loss, _, _ = training.training_step(raw, ThroughWeights(raw), data(), s, 2, training.step_generator(0, 0))
    loss.backward()
    p = params()
    training.train(p, ThroughWeights(p), data(), s, training.make_optimizer(p, 1e-3, s), steps=1, batch_size=2, seed=0)
    kv = raw.kv_delta("kv").grad
    scale = min(1.0, max_norm / (float(kv.norm()) + 1e-6)) if max_norm > 0 else 1.0
    assert scale < 0.1 or max_norm == 0  # the clipping does cut here
    assert torch.allclose(p.kv_delta("kv").grad, kv * scale, rtol=1e-5, atol=0)
    assert torch.equal(p.token_lf.grad, raw.token_lf.grad) and torch.equal(p.token_hf.grad, raw.token_hf.grad)


def test_each_step_starts_without_gradients():
    """Gradients left from before the run are dropped (None, not zeroed): a tensor the step does not reach
    (the RRA layer: the stand-in reads none) keeps no gradient, so AdamW leaves it and its weight decay alone."""
    p, s = params(), settings(weight_decay=0.5)
    for q in p.parameters():
        q.grad = torch.ones_like(q)
    layer = p.rra_layer("output.3.0")
    before = {n: t.detach().clone() for n, t in layer.named_parameters()}
    training.train(p, StandIn(), data(), s, training.make_optimizer(p, 0.1, s), steps=1, batch_size=2, seed=0)
    assert all(t.grad is None and torch.equal(t.detach(), before[n]) for n, t in layer.named_parameters())


def test_train_takes_a_batch_of_one_and_refuses_less():
    p, s = params(), settings()
    assert len(training.train(p, StandIn(), data(), s, training.make_optimizer(p, 1e-3, s), steps=1, batch_size=1,
                              seed=0)) == 1
    with pytest.raises(ValueError, match="^" + re.escape("batch_size must be at least 1, got 0") + "$"):
        training.train(p, StandIn(), data(), s, training.make_optimizer(p, 1e-3, s), steps=1, batch_size=0, seed=0)


def test_resuming_with_the_optimiser_state_continues_exactly():
    s = settings()
    straight = params()
    opt = training.make_optimizer(straight, 0.05, s)
    losses = training.train(straight, StandIn(), data(), s, opt, steps=4, batch_size=2, seed=11)
    half = params()
    opt_half = training.make_optimizer(half, 0.05, s)
    first = training.train(half, StandIn(), data(), s, opt_half, steps=2, batch_size=2, seed=11)
    state = training.optimizer_state(opt_half, half)
    resumed = training.ConceptParameters.from_concept(half.to_concept({}))
    opt_resumed = training.make_optimizer(resumed, 0.05, s)
    training.load_optimizer_state(opt_resumed, resumed, state)
    rest = training.train(resumed, StandIn(), data(), s, opt_resumed, steps=4, batch_size=2, seed=11, start_step=2)
    assert first + rest == pytest.approx(losses, rel=1e-6)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    # without the optimiser state the moments start at zero: the run goes elsewhere
    cold = training.ConceptParameters.from_concept(half.to_concept({}))
    cold_losses = training.train(cold, StandIn(), data(), s, training.make_optimizer(cold, 0.05, s), steps=4,
                                 batch_size=2, seed=11, start_step=2)
    assert cold_losses[1] != pytest.approx(rest[1], rel=1e-6)


def test_on_step_gets_every_term_and_the_branches():
    seen = []
    p = params()
    training.train(p, StandIn(), data(priors=2), settings(), training.make_optimizer(p, 0.01, settings()), steps=2,
                   batch_size=2, seed=0, on_step=lambda step, values: seen.append((step, values)))
    assert [step for step, _ in seen] == [0, 1]
    assert {"loss", "denoise", "prior", "ra", "cross_attention", "branches"} <= set(seen[0][1])
    assert len(seen[0][1]["branches"]) == 2
