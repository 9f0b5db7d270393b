"""eqdiff_core.rra against the equations written out by hand."""

import math
import re

import pytest
import torch

from eqdiff_core import rra


def manual_attention(q, k, v, heads):
    b, n, c = q.shape
    d = c // heads
    out = torch.zeros_like(q)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
        out[..., sl] = w @ v[..., sl]
    return out


def test_multihead_attention_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 16, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    assert torch.allclose(rra.multihead_attention(q, k, v, 4), manual_attention(q, k, v, 4), atol=1e-12)
    probs = rra.attention_probs(q, k, 4)
    assert probs.shape == (2, 4, 5, 7) and torch.allclose(probs.sum(-1), torch.ones(2, 4, 5, dtype=torch.float64))


def test_zero_initialised_layer_is_the_identity():
    layer = rra.RRALayer(8).double()
    g = torch.Generator().manual_seed(1)
    q, sa, f_sa = (torch.randn(3, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ref = torch.randn(1, 10, 8, generator=g, dtype=torch.float64)
    f_ra, gate = layer(q, sa, ref, heads=2)
    assert torch.equal(gate, torch.zeros(3, 6, 1, dtype=torch.float64))
    assert torch.equal(rra.residual_reference_fusion(f_sa, f_ra, gate), f_sa)


def test_layer_follows_eq_8_and_9():
    g = torch.Generator().manual_seed(2)
    d, heads = 8, 2
    to_k, to_v = torch.randn(d, d, generator=g), torch.randn(d, d, generator=g)
    layer = rra.RRALayer.from_self_attention(to_k, to_v)
    assert torch.equal(layer.to_k_res.weight, to_k) and torch.equal(layer.to_v_res.weight, to_v)
    with torch.no_grad():
        layer.h_r.weight.normal_(generator=g)
        layer.h_r.bias.normal_(generator=g)
    q, sa, f_sa = (torch.randn(2, 5, d, generator=g) for _ in range(3))
    ref = torch.randn(2, 9, d, generator=g)
    f_ra, gate = layer(q, sa, ref, heads)
    ra = manual_attention(q, ref @ to_k.T, ref @ to_v.T, heads)  # SA(F^g, F^r, F^r)
    f_l = torch.cat([ra, sa], -1) @ layer.h_r.weight.T + layer.h_r.bias
    assert torch.allclose(f_ra, f_l[..., :d], atol=1e-5)
    assert torch.allclose(gate, f_l[..., d:].clamp(0, 1), atol=1e-5)
    assert ((gate == 0) | (gate == 1)).any() and (gate >= 0).all() and (gate <= 1).all()
    fused = rra.residual_reference_fusion(f_sa, f_ra, gate)
    assert torch.allclose(fused, f_sa * (1 - gate) + f_ra * gate)


def test_one_reference_row_is_expanded_to_the_target_rows():
    """AttentionFn's contract: k and v (B, M, C) with B the target rows, so one reference row is expanded to
    them (an attention that views k as (B, -1, heads, d), as ComfyUI's does, would split a single row's
    positions over the batch); a reference row per target row is passed as it is."""
    seen = []

    def recording(q, k, v, heads):  # the real attention, noting the shapes it is given
        seen.append((tuple(k.shape), tuple(v.shape)))
        return rra.multihead_attention(q, k, v, heads)

    layer = rra.RRALayer(4)
    layer(torch.randn(3, 1, 4), torch.randn(3, 1, 4), torch.randn(1, 3, 4), 2, attention=recording)
    layer(torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.randn(2, 5, 4), 2, attention=recording)
    assert seen == [((3, 3, 4), (3, 3, 4)), ((2, 5, 4), (2, 5, 4))]


def test_reference_attention_loss_forms():
    g = torch.Generator().manual_seed(3)
    a = torch.softmax(torch.randn(2, 4, 6, 5, generator=g), -1)  # (B, heads, N, M)
    m_r = (torch.rand(2, 5, generator=g) > 0.5).float()
    m_g = (torch.rand(2, 6, generator=g) > 0.5).float()
    share = (a.mean(1) * m_r[:, None]).sum(-1)
    official = ((share * m_g - m_g) ** 2).mean()
    paper = torch.stack([torch.sqrt(((share[i] - m_g[i]) ** 2).sum()) for i in range(2)]).mean()
    assert torch.allclose(rra.reference_attention_loss(a, m_r, m_g), official)
    assert torch.allclose(rra.reference_attention_loss(a, m_r, m_g, form="paper"), paper)
    # attention entirely on the reference subject inside the target subject: no loss
    perfect = torch.zeros(1, 2, 3)
    perfect[..., 0] = 1.0
    assert rra.reference_attention_loss(perfect, torch.tensor([[1.0, 0, 0]]), torch.ones(1, 2)) == 0
    with pytest.raises(ValueError, match="form must be"):
        rra.reference_attention_loss(a, m_r, m_g, form="l1")
    with pytest.raises(ValueError, match="^" + re.escape(
            "attention must be (B, N, M) or (B, heads, N, M), got (6, 5)") + "$"):
        rra.reference_attention_loss(a[0, 0], m_r, m_g)
    # masks that would broadcast against (B, N) instead of matching it are refused, not averaged
    for bad_r, bad_g in ((m_r, m_g[:, None]), (m_r[:, None], m_g), (m_r[:1], m_g), (m_r, m_g[:, :5])):
        with pytest.raises(ValueError, match="^" + re.escape(
                f"masks must be (B, M) and (B, N) for attention (B, N, M) (2, 6, 5), got reference "
                f"{tuple(bad_r.shape)} and target {tuple(bad_g.shape)}") + "$"):
            rra.reference_attention_loss(a, bad_r, bad_g, form="paper")


def test_gate_is_closed_exactly_when_the_gate_row_cannot_open():
    layer = rra.RRALayer(4)
    assert rra.gate_is_closed(layer.h_r.weight, layer.h_r.bias)  # zero initialisation
    bias = layer.h_r.bias.detach().clone()
    bias[-1] = -0.5
    assert rra.gate_is_closed(layer.h_r.weight, bias)
    bias[-1] = 0.1
    assert not rra.gate_is_closed(layer.h_r.weight, bias)
    weight = layer.h_r.weight.detach().clone()
    weight[0, 0] = 1.0  # F_RA rows do not matter while the gate is closed
    assert rra.gate_is_closed(weight, layer.h_r.bias)
    weight[-1, 3] = 1e-3
    assert not rra.gate_is_closed(weight, layer.h_r.bias)


def test_gate_clamp_passes_gradient_at_the_bounds():
    g = torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    out = rra.gate_clamp(g)
    assert torch.equal(out.detach(), g.detach().clamp(0, 1))
    out.sum().backward()
    assert g.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_zero_initialised_gate_receives_a_gradient():
    layer = rra.RRALayer(8)
    q, sa, ref = torch.randn(1, 5, 8), torch.randn(1, 5, 8), torch.randn(1, 6, 8)
    f_ra, gate = layer(q, sa, ref, heads=2)
    rra.residual_reference_fusion(sa * 2.0, f_ra, gate).sum().backward()
    assert layer.h_r.weight.grad[-1].abs().max() > 0 and layer.h_r.bias.grad[-1] != 0


def test_attention_with_map_is_softmax_attention_and_its_head_mean():
    """By hand, per head: softmax(q_h k_h^T / sqrt(d)) v_h, heads concatenated; the map averaged over heads."""
    g = torch.Generator().manual_seed(11)
    q, k, v = torch.randn(2, 6, 8, generator=g), torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    out, probs = rra.attention_with_map(q, k, v, heads=2)
    outs, maps = [], []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, dim=-1)  # sqrt(4) = 2
        outs.append(a @ v[..., s])
        maps.append(a)
    assert torch.allclose(out, torch.cat(outs, dim=-1), atol=1e-6)
    assert torch.allclose(probs, (maps[0] + maps[1]) / 2, atol=1e-6)
    out64, _ = rra.attention_with_map(q, k, v.double(), heads=2)  # the map takes the values' dtype
    assert out64.dtype == torch.float64 and torch.allclose(out64, torch.cat(outs, dim=-1).double(), atol=1e-6)


def test_received_attention_is_a_mean_or_a_weighted_mean_over_targets():
    a = torch.tensor([[[0.2, 0.8], [0.6, 0.4], [1.0, 0.0]]])  # (1, N=3, M=2)
    assert torch.allclose(rra.received_attention(a), torch.tensor([[0.6, 0.4]]))
    w = torch.tensor([[1.0, 3.0, 0.0]])  # weights 1/4, 3/4, 0
    assert torch.allclose(rra.received_attention(a, w), torch.tensor([[0.2 / 4 + 0.6 * 3 / 4, 0.8 / 4 + 0.4 * 3 / 4]]))
    # a batch of two, each normalised by its own weights' sum (0.4 and 0.5, below 1: no floor)
    a2 = torch.cat([a, a.flip(1)])
    w2 = torch.tensor([[0.1, 0.3, 0.0], [0.0, 0.0, 0.5]])
    want = torch.tensor([[0.2 / 4 + 0.6 * 3 / 4, 0.8 / 4 + 0.4 * 3 / 4], [0.2, 0.8]])  # 2nd: all on a's first row
    assert torch.allclose(rra.received_attention(a2, w2), want)


def test_loss_layers_are_the_coarsest_output_layers():
    levels = {"middle.0.0": 3, "output.3.0": 2, "output.4.0": 2, "output.6.0": 1, "output.9.0": 0, "input.1.0": 2}
    assert rra.loss_layers(levels, list(levels)) == ["output.3.0", "output.4.0"]
    assert rra.loss_layers(levels, ["output.9.0", "output.6.0"]) == ["output.6.0"]
    assert rra.loss_layers(levels, ["middle.0.0"]) == []


def test_grid_size_keeps_the_aspect_ratio_and_token_grid_upsamples():
    assert rra.grid_size(64, 64, 64) == (8, 8) and rra.grid_size(24, 32, 48) == (4, 6)
    assert rra.grid_size(6, 8, 12) == (2, 3) and rra.grid_size(1, 64, 64) == (1, 1)
    with pytest.raises(ValueError, match="10 tokens do not form a grid of the 8x8 latent's aspect ratio"):
        rra.grid_size(10, 8, 8)
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])  # a 2 x 3 grid, row-major
    assert torch.equal(rra.token_grid(values, 2, 3), values.view(1, 2, 3))
    up = rra.token_grid(values, 4, 6)
    assert up.shape == (1, 4, 6) and up[0, 0, 0] == 0.0 and up[0, -1, -1] == 5.0  # corners kept (bilinear, half-pixel)
    assert float(up[0, 0, 1]) == pytest.approx(0.25)  # 1/4 of the way from 0 to 1 (half-pixel centres)


def test_layer_parameters_take_the_requested_dtype():
    layer = rra.RRALayer(4, dtype=torch.float64)
    assert {n: p.dtype for n, p in layer.named_parameters()} == dict.fromkeys(
        ["to_k_res.weight", "to_v_res.weight", "h_r.weight", "h_r.bias"], torch.float64)
    to_k = torch.randn(4, 4, dtype=torch.float64)
    layer = rra.RRALayer.from_self_attention(to_k, 2 * to_k)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert torch.equal(layer.to_k_res.weight, to_k) and torch.equal(layer.to_v_res.weight, 2 * to_k)  # no rounding


def test_layer_parameters_are_made_on_the_requested_device():
    """Meta stands in for an accelerator: every parameter on it, also for a layer copied from meta weights."""
    layer = rra.RRALayer(4, device="meta")
    assert {p.device.type for p in layer.parameters()} == {"meta"}
    to_k = torch.empty(4, 4, device="meta")
    assert {p.device.type for p in rra.RRALayer.from_self_attention(to_k, to_k).parameters()} == {"meta"}
