"""ICO contexts and PureCC's loss in eqdiff_core.training, on the stand-in backend of test_training_step.

ICO (DCI/ICO Eq. 2, notes §2.2): each (branch, photo) has its own context tokens around the concept
token; they may move only through the rows of their own photo, and are no part of the concept.
PureCC (notes §1.2, §1.5): L = L_CC + eta || eps(y) - [eps_base + lambda (eps_ext(y_tgt) - eps_ext(0))] ||^2,
written out below with numpy from the recorded predictions of each pass.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from eqdiff_core import training
from unit.test_training_step import PLACEHOLDER, D, H, L, StandIn, data, params, settings

M, S_L = 2, 1            # ICO prefix and suffix contexts: the stand-in's ICO prompt is c0 c1 S* <class> c2 (L = 5)
ICO_PLACEHOLDER = M


class MethodsStandIn(StandIn):
    """The stand-in with ICO's prompt and PureCC's frozen passes; every prediction is recorded with
    whether autograd was on."""

    def __init__(self, seed: int = 0):
        super().__init__(seed=seed)
        g = torch.Generator().manual_seed(seed + 100)
        self._base_prompt = torch.randn(1, L, D, generator=g)
        self._empty = torch.randn(1, L, D, generator=g)
        self.extractor_shift = torch.randn(4, generator=g)[None, :, None, None]
        self.calls["frozen"] = []
        self.calls["ico"] = []
        self.outputs: list[tuple[str, torch.Tensor]] = []
        self.grad_modes: list[bool] = []  # autograd on in each predict call

    def ico_context(self, embeddings, contexts):
        self.calls["ico"].append((embeddings.detach().clone(), contexts.detach().clone()))
        rows = self.template.expand(embeddings.shape[0], -1, -1).clone()
        rows[:, :M] = contexts[:, :M]
        rows[:, ICO_PLACEHOLDER] = embeddings
        rows[:, L - S_L:] = contexts[:, M:]
        return rows

    def purecc_contexts(self):
        return self._base_prompt, self._empty

    def predict(self, x, timesteps, context, reference, recorded_rows):
        out = super().predict(x, timesteps, context, reference, recorded_rows)
        self.outputs.append(("predict", out.noise))
        self.grad_modes.append(torch.is_grad_enabled())
        return out

    def frozen_prediction(self, x, timesteps, context, weights):
        self.calls["frozen"].append((x.clone(), timesteps.clone(), context.clone(), weights, torch.is_grad_enabled()))
        out = 0.4 * x + (context.mean(1) @ self.mix)[:, :, None, None]
        if weights == "extractor":
            out = out + self.extractor_shift
        self.outputs.append((weights, out))
        return out


def ico_params(photos=3, seed=3) -> training.ConceptParameters:
    p = params()
    g = torch.Generator().manual_seed(seed)
    p.contexts = torch.nn.Parameter(torch.randn(3, photos, M + S_L, D, generator=g))
    return p


def ico_settings(**overrides):
    return settings(ico_prefix_tokens=M, ico_suffix_tokens=S_L, **overrides)


# -- ICO -------------------------------------------------------------------------------------------------
def test_settings_refuse_bad_ico_and_purecc_values_by_name():
    assert training.PRESETS["official"].ico_contexts == 0 and training.PRESETS["paper"].ico_contexts == 0
    assert not training.PRESETS["official"].purecc and not training.PRESETS["paper"].purecc
    for bad, name in [(dict(ico_prefix_tokens=-1), "ico_prefix_tokens"), (dict(ico_suffix_tokens=40), "ico_suffix_tokens"),
                      (dict(ico_lr_multiplier=0.0), "ico_lr_multiplier"), (dict(purecc_weight=-2.0), "purecc_weight"),
                      (dict(purecc_extractor="lora"), "purecc_extractor"), (dict(purecc_base="x"), "purecc_base"),
                      (dict(purecc_base_prompt="a {token}"), "purecc_base_prompt"),
                      (dict(ico_prefix_tokens=1, ico_prefix_init=" "), "ico_prefix_init"),
                      (dict(purecc_lambda=float("nan")), "purecc_lambda")]:
        with pytest.raises(ValueError, match=name):
            settings(**bad)


def test_ico_prompt_carries_each_photos_own_contexts_and_class_images_keep_theirs():
    backend, p = MethodsStandIn(), ico_params()
    batch = training.Batch(torch.tensor([2, 0, 2]), torch.tensor([training.HIGH, training.ORIGINAL, training.LOW]),
                           torch.tensor([1]), torch.tensor([training.ORIGINAL]))
    context = training.text_context(p, backend, batch)
    tokens = [p.token_hf, p.token_lf + p.token_hf, p.token_lf]
    for row, (branch, photo) in enumerate([(training.HIGH, 2), (training.ORIGINAL, 0), (training.LOW, 2)]):
        own = p.contexts[branch, photo]
        assert torch.equal(context[row, :M], own[:M]) and torch.equal(context[row, L - S_L:], own[M:])
        assert torch.allclose(context[row, ICO_PLACEHOLDER], tokens[row])
    assert torch.equal(context[3], backend.class_context()[0])  # the class image: the plain class prompt


@pytest.mark.parametrize("index_device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_batch_indices_on_another_device_pick_the_same_rows(index_device):
    """text_context moves the batch's indices to the parameters' device (CUDA indices cannot index CPU
    tensors), with ICO contexts and without: the rows equal those of a batch on the parameters' device."""
    if index_device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    backend = MethodsStandIn()
    photos, branches = torch.tensor([2, 0, 2]), torch.tensor([training.HIGH, training.ORIGINAL, training.LOW])
    none = torch.zeros(0, dtype=torch.long)
    here = training.Batch(photos, branches, none, none)
    there = training.Batch(photos.to(index_device), branches.to(index_device), none, none)
    for p in (ico_params(), params()):
        assert torch.equal(training.text_context(p, backend, there), training.text_context(p, backend, here))


def test_ico_contexts_get_gradient_only_from_their_own_photos_rows():
    """The contexts' .grad is the sum, over the batch rows of the same (branch, photo), of that row's own
    gradient, and zero for every (branch, photo) not in the batch; the class image gives none."""
    backend = MethodsStandIn()
    d = data(photos=3, priors=2)
    batch = training.Batch(torch.tensor([2, 0, 2]), torch.tensor([training.HIGH, training.LOW, training.HIGH]),
                           torch.tensor([1]), torch.tensor([training.ORIGINAL]))
    x = torch.randn(4, 4, H, H, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([3, 300, 600, 900])

    def row_losses(p):
        out = backend.predict(x, t, training.text_context(p, backend, batch), None, recorded_rows=0)
        return (out.noise ** 2).flatten(1).sum(1)  # one scalar per row

    p = ico_params()
    row_losses(p).sum().backward()
    per_row = []
    for row in range(4):
        q = ico_params()
        row_losses(q)[row].backward()
        per_row.append(q.contexts.grad.clone())
    grad = p.contexts.grad
    assert per_row[3].abs().max() == 0                      # the class image's row
    assert torch.allclose(grad[training.HIGH, 2], per_row[0][training.HIGH, 2] + per_row[2][training.HIGH, 2])
    assert torch.allclose(grad[training.LOW, 0], per_row[1][training.LOW, 0])
    assert grad[training.HIGH, 2].abs().min() > 0 and grad[training.LOW, 0].abs().min() > 0
    used = torch.zeros(3, 3, dtype=torch.bool)
    used[training.HIGH, 2] = used[training.LOW, 0] = True
    assert grad[~used].abs().max() == 0
    # each row's own gradient stays at its own (branch, photo)
    for row, (branch, photo) in enumerate([(training.HIGH, 2), (training.LOW, 0), (training.HIGH, 2)]):
        alone = torch.zeros(3, 3, dtype=torch.bool)
        alone[branch, photo] = True
        assert per_row[row][~alone].abs().max() == 0


def test_a_training_step_with_ico_moves_only_the_drawn_photos_contexts_at_ten_times_the_rate():
    p, s = ico_params(), ico_settings(weight_decay=0.0, prior_loss_weight=0.0)
    opt = training.make_optimizer(p, 1e-3, s)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3 * 10]  # the DCI/ICO code: contexts at 10x
    assert opt.param_groups[1]["params"] == [p.contexts]
    before = p.contexts.detach().clone(), p.token_lf.detach().clone(), p.token_hf.detach().clone()
    backend = MethodsStandIn()
    loss, _, batch = training.training_step(p, backend, data(photos=3), s, 2, training.step_generator(0, 4))
    opt.zero_grad()
    loss.backward()
    drawn = torch.zeros(3, 3, dtype=torch.bool)
    drawn[batch.branches, batch.photos] = True
    assert p.contexts.grad[~drawn].abs().max() == 0 and p.contexts.grad[drawn].abs().min() > 0
    opt.step()
    moved = (p.contexts.detach() - before[0]).abs()
    # Adam's first step moves each element by lr * g / (|g| + eps): about the group's rate
    assert torch.allclose(moved[drawn], torch.full_like(moved[drawn], 1e-2), rtol=1e-3)
    assert moved[~drawn].max() == 0
    token_moved = torch.cat([(p.token_lf.detach() - before[1]).abs(), (p.token_hf.detach() - before[2]).abs()])
    assert token_moved.max() <= 1e-3 * 1.001
    assert backend.calls["ico"] and len(backend.calls["predict"]) == 1


def test_ico_contexts_are_no_part_of_the_concept_and_come_back_on_resume():
    p, s = ico_params(), ico_settings()
    plain = params()  # the same tensors without contexts
    concept = p.to_concept({"name": "x"})
    assert concept.fingerprint() == plain.to_concept({"name": "x"}).fingerprint()
    assert all(k.startswith(("token.", "kv.", "rra.")) for k in concept.tensors(with_training_state=False))
    opt = training.make_optimizer(p, 1e-3, s)
    training.train(p, MethodsStandIn(), data(), s, opt, steps=1, batch_size=2, seed=0)
    state = training.optimizer_state(opt, p)
    assert torch.equal(state[training.ICO_STATE], p.contexts.detach())
    concept.training_state = state
    resumed = training.ConceptParameters.from_concept(concept)
    assert torch.equal(resumed.contexts.detach(), p.contexts.detach())
    assert training.ConceptParameters.from_concept(p.to_concept({})).contexts is None
    assert training.optimizer_state(opt, p.double())[training.ICO_STATE].dtype == torch.float32  # stored as float32
    # the contexts are checked for finiteness with the embeddings (not clipped)
    assert [id(t) for t in p.embedding_parameters()] == [id(p.token_lf), id(p.token_hf), id(p.contexts)]


# -- PureCC ----------------------------------------------------------------------------------------------
def extractor_tokens(seed=9) -> torch.Tensor:
    return torch.randn(2, D, generator=torch.Generator().manual_seed(seed))


def purecc_data(priors=2):
    d = data(photos=3, priors=priors)
    d.extractor_tokens = extractor_tokens()
    return d


def hand_masked_mse(a, b, m):
    """Eq. 7 with the authors' normalisation: per row sum M (a - b)^2 / sum M, averaged over rows (numpy)."""
    return float(np.mean([np.sum(m[i] * (a[i] - b[i]) ** 2) / np.sum(m[i]) for i in range(a.shape[0])]))


@pytest.mark.parametrize("extractor,base,masked", [("concept", "trained", True), ("token_only", "frozen", False)])
def test_purecc_step_equals_the_hand_computation(extractor, base, masked):
    eta, lam = 2.0, 1.0
    s = settings(purecc_weight=eta, purecc_lambda=lam, purecc_extractor=extractor, purecc_base=base,
                 purecc_masked=masked, ra_loss_weight=0.0, cross_attention_loss_weight=0.0, prior_loss_weight=0.5)
    d, p, backend = purecc_data(), params(), MethodsStandIn()
    loss, parts, batch = training.training_step(p, backend, d, s, 2, training.step_generator(1, 2))
    b = batch.size
    # the passes: the trained one on every row, then eps_base, then the extractor on [y_tgt, empty]
    kinds = [k for k, _ in backend.outputs]
    weights = "extractor" if extractor == "concept" else "base"
    assert kinds == (["predict", "predict", weights] if base == "trained" else ["predict", "base", weights])
    eps_y = backend.outputs[0][1][:b].detach().double().numpy()
    eps_base = backend.outputs[1][1].detach().double().numpy()
    ext = backend.outputs[2][1].double().numpy()
    eps_tgt, eps_null = ext[:b], ext[b:]
    # what went into them
    z_t = backend.calls["predict"][0][0]
    base_context, empty = backend.purecc_contexts()
    frozen = backend.calls["frozen"]
    if base == "trained":
        x, _, context, rows = backend.calls["predict"][1]
        assert torch.equal(x, z_t[:b]) and rows == 0 and torch.equal(context, base_context.expand(b, -1, -1))
    else:
        x, _, context, w, grad_on = frozen.pop(0)
        assert torch.equal(x, z_t[:b]) and w == "base" and not grad_on and torch.equal(context, base_context.expand(b, -1, -1))
    x, t, context, w, grad_on = frozen[0]
    assert not grad_on and w == weights and torch.equal(x, torch.cat([z_t[:b], z_t[:b]]))
    tok = extractor_tokens()
    want_tokens = [{training.LOW: tok[0], training.HIGH: tok[1], training.ORIGINAL: tok[0] + tok[1]}[int(br)]
                   for br in batch.branches]
    for row in range(b):  # y_tgt: the instance prompt with the Stage-1 embedding of the row's branch
        assert torch.allclose(context[row, PLACEHOLDER], want_tokens[row])
        assert torch.equal(context[b + row], empty[0])
    # the loss, by hand
    g = training.step_generator(1, 2)
    again = training.draw_batch(d, s, 2, g)
    z0, masks = training.batch_latents(d, again)
    _, noise, _ = training.masked_noising(z0, masks, backend.alphas_cumprod, s, g)
    eps, m = noise.double().numpy(), masks.double().numpy()
    eps_hat = backend.outputs[0][1].detach().double().numpy()
    target = eps_base + lam * (eps_tgt - eps_null)
    denoise = hand_masked_mse(eps_y, eps[:b], m[:b])
    pure = hand_masked_mse(eps_y, target, m[:b] if masked else np.ones_like(m[:b]))
    prior = np.mean((eps_hat[b:] - eps[b:]) ** 2)
    assert float(parts.purecc) == pytest.approx(pure, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(denoise + 0.5 * prior + eta * pure, rel=1e-6)
    assert "purecc" in parts.values()


@pytest.mark.parametrize("masked", [True, False])
def test_purecc_term_takes_eq7s_normalisation_inside_the_mask_or_everywhere(masked):
    """L_PureCC against a target that varies over the image (so the mask counts): Eq. 7's normalisation
    (here "elements": also divided by the 4 channels), inside the MGDP mask with purecc_masked."""
    g = torch.Generator().manual_seed(13)
    b = 2
    out = training.StepOutput(torch.randn(b, 4, H, H, generator=g))
    noise, target = torch.randn(b, 4, H, H, generator=g), torch.randn(b, 4, H, H, generator=g)
    masks = (torch.rand(b, 1, H, H, generator=g) > 0.3).float()
    none = torch.zeros(0, dtype=torch.long)
    batch = training.Batch(torch.tensor([0, 1]), torch.tensor([2, 2]), none, none)
    s = settings(purecc_weight=2.0, purecc_masked=masked, masked_loss_normalisation="elements")
    loss, parts = training.losses(out, noise, masks, masks, None, batch, s, target)
    eps_hat, m = out.noise.double().numpy(), masks.double().numpy()
    pure = hand_masked_mse(eps_hat, target.double().numpy(), m if masked else np.ones_like(m)) / 4
    denoise = hand_masked_mse(eps_hat, noise.double().numpy(), m) / 4
    assert float(parts.purecc) == pytest.approx(pure, rel=1e-6)
    assert float(loss) == pytest.approx(denoise + 2.0 * pure, rel=1e-6)


def test_purecc_eps_base_runs_with_autograd_only_when_it_is_the_trained_model():
    """The stand-in's prediction holds no trained weights, so whether gradients reach them through eps_base
    is checked on the real UNet (tests/comfy/test_ico_purecc.py); here, that autograd is on for that pass."""
    d = purecc_data(priors=0)
    for base in ("trained", "frozen"):
        backend = MethodsStandIn()
        s = settings(purecc_weight=2.0, purecc_base=base, ra_loss_weight=0.0, cross_attention_loss_weight=0.0)
        training.training_step(params(), backend, d, s, 2, training.step_generator(0, 0))
        assert backend.grad_modes == ([True, True] if base == "trained" else [True])
        assert [grad_on for *_, grad_on in backend.calls["frozen"]] == ([False] if base == "trained" else [False, False])


def test_purecc_with_eta_zero_is_the_plain_step_exactly():
    d = purecc_data()
    runs = []
    for s in (settings(), settings(purecc_weight=0.0, purecc_lambda=3.0, purecc_extractor="token_only",
                                   purecc_base="frozen", purecc_masked=False)):
        p, backend = params(), MethodsStandIn()
        loss, parts, _ = training.training_step(p, backend, d, s, 2, training.step_generator(4, 1))
        loss.backward()
        runs.append((loss.detach(), {n: q.grad.clone() for n, q in p.named_parameters() if q.grad is not None},
                     backend.calls["frozen"], parts.purecc))
    (plain, plain_grads, _, _), (zero, zero_grads, frozen, term) = runs
    assert torch.equal(plain, zero) and frozen == [] and term is None
    assert plain_grads.keys() == zero_grads.keys() and all(torch.equal(plain_grads[k], zero_grads[k]) for k in plain_grads)
    on, _, _ = training.training_step(params(), MethodsStandIn(), d, settings(purecc_weight=2.0), 2,
                                      training.step_generator(4, 1))
    assert float(on.detach()) != pytest.approx(float(plain), rel=1e-6)  # and eta > 0 does change it


def test_purecc_without_an_extractor_is_refused():
    message = "PureCC needs its extractor (the Stage-1 concept); none was given"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        training.training_step(params(), MethodsStandIn(), data(), settings(purecc_weight=2.0), 2,
                               training.step_generator(0, 0))
