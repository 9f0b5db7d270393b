"""Random-weight concepts for tests, written through the pack's own concept writer."""

from __future__ import annotations

import re

import torch

from eqdiff_core.concept import Concept

_LAYER = re.compile(r"diffusion_model\.(input_blocks\.(\d+)|middle_block|output_blocks\.(\d+))\.\d+\.transformer_blocks\.(\d+)"
                    r"\.attn1\.to_q\.weight$")
_BLOCK_NAMES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


def model_shapes(state_dict_shapes: dict[str, tuple]) -> tuple[dict, dict]:
    """From UNet weight shapes keyed ``diffusion_model.*`` (or a checkpoint's ``model.diffusion_model.*``):
    the cross-attention K/V shapes and the self-attention widths by RRA layer key."""
    kv, dims = {}, {}
    for key, shape in state_dict_shapes.items():
        key = key.removeprefix("model.")
        if re.search(r"attn2\.to_[kv]\.weight$", key):
            kv[key] = tuple(shape)
        m = _LAYER.search(key)
        if m:
            block = m.group(1).split(".")[0]
            number = int(m.group(2) or m.group(3) or 0)
            dims[f"{_BLOCK_NAMES[block]}.{number}.{m.group(4)}"] = shape[0]
    return kv, dims


def random_concept(kv_shapes: dict, rra_dims: dict, token_dim: int = 768, seed: int = 0, gate: float | None = None,
                   layers=("middle", "output"), name: str = "testconcept") -> Concept:
    """H_r is zero (gate None: the layers start as identities) or random with gate bias ``gate``."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale  # noqa: E731
    rra = {}
    for key, d in sorted(rra_dims.items()):
        if key.split(".")[0] not in layers:
            continue
        h_w = torch.zeros(d + 1, 2 * d) if gate is None else rnd(d + 1, 2 * d, scale=0.5 / (2 * d) ** 0.5)
        h_b = torch.zeros(d + 1)
        if gate is not None:
            h_b[-1] = gate
        rra[key] = {"to_k_res": rnd(d, d, scale=d**-0.5), "to_v_res": rnd(d, d, scale=d**-0.5),
                    "h_r.weight": h_w, "h_r.bias": h_b}
    return Concept(
        token_lf=rnd(token_dim, scale=0.02), token_hf=rnd(token_dim, scale=0.02),
        kv_deltas={k: rnd(*s, scale=0.02) for k, s in sorted(kv_shapes.items())},
        rra=rra, reference_context=rnd(77, token_dim, scale=0.5),
        metadata={"name": name, "token": f"<{name}>", "class_word": "dog", "base_model": "eqdiff_tiny_sd15"},
    )
