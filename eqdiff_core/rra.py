"""Residual Reference Attention (paper §4.3, Eq. 8-10).

In a self-attention layer of the target UNet, with target features F^g (the layer's normed input)
and reference features F^r (the same layer's normed input in a pass of the frozen UNet over the
reference latent):

    SA  = SA(F^g, F^g, F^g)                 the layer's own attention, before its output projection
    RA  = SA(F^g, F^r, F^r)                 queries of the target, keys/values projected from F^r
    F_l = H_r([RA, SA])                     H_r: Linear 2d -> d+1, zero-initialised      (Eq. 8)
    F_RA, M^f = F_l[..., :d], clamp(F_l[..., d:], 0, 1)
    F_SA = H_s(SA)                          H_s: the layer's frozen output projection
    F_RRA = F_SA * (1 - M^f) + F_RA * M^f                                                  (Eq. 9)

As in the authors' code, the reference keys and values have their own projections
(``to_k_res``, ``to_v_res``, initialised from the layer's frozen ``to_k``/``to_v``) and the queries
are the layer's own. With H_r zero, M^f = 0 and the layer is exactly the pretrained one.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# which self-attention layers get RRA, by UNet part; the authors use the middle and output blocks
RRA_LAYER_SETS = {
    "middle+output": ("middle", "output"),
    "output": ("output",),
    "middle": ("middle",),
    "all": ("input", "middle", "output"),
}

# the two forms of L_ra (reference_attention_loss)
LOSS_FORMS = ("official", "paper")

# attention(q, k, v, heads) -> out, with q (B, N, C), k/v (B, M, C), out (B, N, C)
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head)) v over ``heads`` heads (Eq. 2); (B, N, C) x (B, M, C) -> (B, N, C)."""
    b, n, c = q.shape
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, c)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """The attention map A = softmax(q k^T / sqrt(d_head)) per head: (B, N, C) x (B, M, C) -> (B, heads, N, M)."""
    b, n, c = q.shape
    qh = q.reshape(b, n, heads, c // heads).transpose(1, 2)
    kh = k.reshape(k.shape[0], k.shape[1], heads, c // heads).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) * (c // heads) ** -0.5, dim=-1)


def attention_with_map(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, for layers whose map a loss needs: (B, N, C) x (B, M, C) -> the output
    (B, N, C) and the map averaged over heads (B, N, M)."""
    b, n, c = q.shape
    probs = attention_probs(q, k, heads)
    vh = v.reshape(v.shape[0], v.shape[1], heads, c // heads).transpose(1, 2)
    out = (probs.to(vh.dtype) @ vh).transpose(1, 2).reshape(b, n, c)
    return out, probs.mean(dim=1)


class RRALayer(nn.Module):
    """The trainable part of RRA for one self-attention layer of width ``dim``.

    Parameters: ``to_k_res``, ``to_v_res`` (Linear d -> d, no bias) and ``h_r`` (Linear 2d -> d+1).
    """

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.dim = dim
        self.to_k_res = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.to_v_res = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.h_r = nn.Linear(2 * dim, dim + 1, device=device, dtype=dtype)
        nn.init.zeros_(self.h_r.weight)  # zero-initialised H_r: M^f = 0, the layer starts as the base layer
        nn.init.zeros_(self.h_r.bias)

    @classmethod
    def from_self_attention(cls, to_k: torch.Tensor, to_v: torch.Tensor) -> "RRALayer":
        """A fresh layer whose reference projections start as the frozen layer's ``to_k``/``to_v`` (d, d)."""
        layer = cls(to_k.shape[0], device=to_k.device, dtype=to_k.dtype)
        with torch.no_grad():
            layer.to_k_res.weight.copy_(to_k)
            layer.to_v_res.weight.copy_(to_v)
        return layer

    def reference_keys_values(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F^r (R, M, d) -> keys and values of the reference attention, each (R, M, d)."""
        return self.to_k_res(reference), self.to_v_res(reference)

    def fuse(self, ra: torch.Tensor, sa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 8: H_r([RA, SA]) split into F_RA (B, N, d) and the reference mask M^f (B, N, 1)."""
        f_l = self.h_r(torch.cat([ra, sa], dim=-1))
        return f_l[..., : self.dim], gate_clamp(f_l[..., self.dim :])

    def forward(
        self,
        q: torch.Tensor,
        sa: torch.Tensor,
        reference: torch.Tensor,
        heads: int,
        attention: AttentionFn = multihead_attention,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference attention and fusion for target queries q (B, N, d), the layer's own attention
        output SA (B, N, d) before H_s, and reference features (B or 1, M, d).

        Returns (F_RA, M^f); combine them with ``H_s(SA)`` through ``residual_reference_fusion``.
        """
        k_r, v_r = self.reference_keys_values(reference)
        if k_r.shape[0] != q.shape[0]:
            k_r, v_r = k_r.expand(q.shape[0], -1, -1), v_r.expand(q.shape[0], -1, -1)
        ra = attention(q, k_r, v_r, heads)  # SA(F^g, F^r, F^r)
        return self.fuse(ra, sa)


def gate_clamp(g: torch.Tensor) -> torch.Tensor:
    """phi = clamp(g, 0, 1), whose gradient passes at the bounds themselves. torch's clamp has a zero
    gradient at g = 0 exactly, where the zero-initialised H_r puts every gate: the gate would never open."""
    return torch.where((g >= 0.0) & (g <= 1.0), g, g.detach().clamp(0.0, 1.0))


def gate_is_closed(h_r_weight: torch.Tensor, h_r_bias: torch.Tensor) -> bool:
    """True when M^f = clamp(w . [RA, SA] + b, 0, 1) is 0 for every input (gate row w = 0, b <= 0):
    the layer is then exactly the base layer (Eq. 9), as after zero initialisation.
    h_r_weight: (d+1, 2d), h_r_bias: (d+1,)."""
    return bool((h_r_weight[-1] == 0).all() and h_r_bias[-1] <= 0)


def residual_reference_fusion(f_sa: torch.Tensor, f_ra: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 9: F_RRA = F_SA (1 - M^f) + F_RA M^f; (B, N, d), (B, N, d), (B, N, 1) -> (B, N, d)."""
    return f_sa * (1.0 - mask) + f_ra * mask


def reference_attention_loss(
    attention: torch.Tensor,
    reference_mask: torch.Tensor,
    target_mask: torch.Tensor,
    form: str = "official",
) -> torch.Tensor:
    """L_ra (Eq. 10): the share of each target position's reference attention that lands on the
    reference subject should be 1 inside the target subject.

    Args:
        attention: A, (B, N, M) (or (B, heads, N, M), averaged over heads), rows summing to 1.
        reference_mask: M^r, (B, M) in [0, 1] at the reference feature resolution.
        target_mask: M^g, (B, N) in [0, 1] at the target feature resolution.
        form: ``paper`` = || sum_j (A * M^r)_ij - M^g ||_2 per sample, averaged over the batch;
            ``official`` = mean((a_fg * M^g - M^g)^2), the authors' code, which leaves the background
            unconstrained.
    Returns: a scalar.
    """
    if attention.ndim == 4:
        attention = attention.mean(dim=1)
    if attention.ndim != 3:
        raise ValueError(f"attention must be (B, N, M) or (B, heads, N, M), got {tuple(attention.shape)}")
    if reference_mask.shape != (attention.shape[0], attention.shape[2]) or target_mask.shape != attention.shape[:2]:
        raise ValueError(f"masks must be (B, M) and (B, N) for attention (B, N, M) {tuple(attention.shape)}, got "
                         f"reference {tuple(reference_mask.shape)} and target {tuple(target_mask.shape)}")
    foreground_share = subject_share(attention, reference_mask)
    if form == "paper":
        return torch.linalg.vector_norm(foreground_share - target_mask, dim=-1).mean()
    if form == "official":
        return ((foreground_share * target_mask - target_mask) ** 2).mean()
    raise ValueError(f"form must be 'paper' or 'official', got {form!r}")


def subject_share(attention: torch.Tensor, reference_mask: torch.Tensor) -> torch.Tensor:
    """The aggregated reference attention of Eq. 10: per target position, the share of its reference
    attention that lands on the reference subject, sum_j {A * M^r}_ij. (B, N, M), (B, M) -> (B, N)."""
    return (attention * reference_mask[:, None, :]).sum(dim=-1)


def received_attention(attention: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """How much attention each reference position receives, averaged over the target positions
    (weighted, e.g. by the reference mask M^f, where given): (B, N, M), (B, N) -> (B, M)."""
    if weights is None:
        return attention.mean(dim=1)
    w = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-8)
    return (attention * w[:, :, None]).sum(dim=1)


def loss_layers(levels: dict[str, int], rra_keys) -> list[str]:
    """The RRA layers of L_ra: the output-block ones at the coarsest resolution. ``levels``: layer key ->
    how many times the latent is halved there. SD1.5: the three 16x16 layers of output blocks 3-5 at
    512 px, the authors' up_blocks.1."""
    output = [k for k in rra_keys if k.startswith("output.")]
    level = max((levels[k] for k in output), default=None)
    return sorted(k for k in output if levels[k] == level)


def grid_size(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) grid of an attention layer with ``tokens`` positions over a height x width latent: the
    layer's grid keeps the latent's aspect ratio."""
    scale = (height * width / tokens) ** 0.5
    h, w = max(1, round(height / scale)), max(1, round(width / scale))
    if h * w != tokens:
        raise ValueError(f"{tokens} tokens do not form a grid of the {height}x{width} latent's aspect ratio")
    return h, w


def token_grid(values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-token values of an attention layer back on its grid, upsampled to (height, width).
    (B, N) -> (B, height, width)."""
    b, n = values.shape
    grid = values.reshape(b, 1, *grid_size(n, height, width)).float()
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
