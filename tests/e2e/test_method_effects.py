"""The method's parts act where they should in the real server, and only there: the concept's K/V at
strength 1 vs 0, RRA with its gate pinned open vs off, the concept's embedding at the prompt's token.

workflows/api/generate.json at 64 px and 3 steps, on concept files written here (random weights for
the tiny checkpoint, tests/concept_factory.py) into the e2e server's concept folder.
"""

import copy
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from comfy_env import REPO, TINY_CHECKPOINT

GENERATE = json.loads((REPO / "workflows" / "api" / "generate.json").read_text())
CONCEPTS = REPO / "artifacts" / "e2e" / "concepts"  # the e2e server's concept folder (conftest.py)
PROMPT = "a photo of <effects> backpack on the beach"


@pytest.fixture(scope="module")
def concepts(server):
    """effects_open: gate bias 1e4 (the RRA gate clamps to 1 everywhere) and K/V deltas 10x the
    factory's; effects_token: the same file with other token embeddings."""
    from safetensors import safe_open

    from concept_factory import model_shapes, random_concept
    from eqdiff_core.concept import save

    assert CONCEPTS.is_dir()
    with safe_open(str(TINY_CHECKPOINT), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.diffusion_model.")}
    base = random_concept(*model_shapes(shapes), gate=1e4, seed=11, name="effects")
    base = dataclasses.replace(base, kv_deltas={k: 10 * v for k, v in base.kv_deltas.items()})
    other_token = dataclasses.replace(base, token_lf=base.token_lf.flip(0) * 3, token_hf=base.token_hf.flip(0) * 3)
    save(base, str(CONCEPTS / "effects_open.safetensors"))
    save(other_token, str(CONCEPTS / "effects_token.safetensors"))
    return "effects_open.safetensors", "effects_token.safetensors"


def workflow(concept: str, *, strength=1.0, rra=None, model_from="apply", text=PROMPT) -> dict:
    """generate.json at 64 px, 3 steps. ``rra``: None leaves the RRA Patch out, else its strength;
    ``model_from``: "apply" (Apply Concept's MODEL) or "checkpoint" (the unpatched MODEL)."""
    p = copy.deepcopy(GENERATE)
    p["2"]["inputs"]["concept_name"] = concept
    p["3"]["inputs"].update(strength=strength, token="<effects>")
    p["6"]["inputs"]["text"] = text
    p["8"]["inputs"].update(width=64, height=64)
    p["9"]["inputs"]["steps"] = 3
    if rra is None:
        p["9"]["inputs"]["model"] = ["3", 0] if model_from == "apply" else ["1", 0]
        del p["4"], p["5"]
    else:
        p["5"]["inputs"].update(strength=rra, cache=False)
    return p


def image(server, prompt: dict, prefix: str) -> np.ndarray:
    prompt["11"]["inputs"]["filename_prefix"] = f"e2e_effects/{prefix}"
    files = server.output_files(server.run(prompt), "11")
    assert len(files) == 1
    return np.asarray(Image.open(files[0]))


def test_concept_strength_one_changes_the_image_and_zero_is_no_patch(server, concepts):
    open_concept, _ = concepts
    on = image(server, workflow(open_concept, strength=1.0), "strength1")
    zero = image(server, workflow(open_concept, strength=0.0), "strength0")
    unpatched = image(server, workflow(open_concept, model_from="checkpoint"), "no_patch")
    assert on.shape == (64, 64, 3)
    assert np.array_equal(zero, unpatched), "strength 0 must be the checkpoint's weights, bit for bit"
    assert np.abs(on.astype(int) - zero.astype(int)).max() > 8, "the K/V deltas must change the image"


def test_rra_with_an_open_gate_changes_the_image_and_off_leaves_it(server, concepts):
    open_concept, _ = concepts
    without = image(server, workflow(open_concept), "no_rra")
    off = image(server, workflow(open_concept, rra=0.0), "rra0")
    on = image(server, workflow(open_concept, rra=1.0), "rra1")
    assert np.array_equal(off, without), "RRA at strength 0 must leave the image as it is"
    assert np.abs(on.astype(int) - without.astype(int)).max() > 8, "an open RRA gate must change the image"


def test_the_concepts_embedding_reaches_the_prompts_token(server, concepts):
    """Two files that differ only in S*_LF / S*_HF: different images where the prompt has the token,
    the same image where it has not."""
    first, second = concepts
    with_token = [image(server, workflow(c), f"token_{i}") for i, c in enumerate(concepts)]
    assert np.abs(with_token[0].astype(int) - with_token[1].astype(int)).max() > 8
    plain = "a photo of a backpack on the beach"
    without = [image(server, workflow(c, text=plain), f"plain_{i}") for i, c in enumerate((first, second))]
    assert np.array_equal(without[0], without[1])
