"""eqdiff_core.concept: atomic save, load, validation, errors that say what is wrong."""

import hashlib
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from concept_factory import random_concept
from eqdiff_core import concept as cio

KV = {"diffusion_model.output_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (16, 24)}
DIMS = {"output.1.0": 16, "middle.0.0": 16}


def make(**kw):
    return random_concept(KV, DIMS, token_dim=24, gate=0.3, **kw)


def test_round_trip_keeps_every_tensor_and_the_metadata(tmp_path):
    c = make()
    c.metadata["loss_history"] = [0.5, 0.25]
    path = cio.save(c, str(tmp_path / "sub" / "c.safetensors"))
    back = cio.load(path)
    assert back.tensors().keys() == c.tensors().keys()
    assert all(torch.equal(back.tensors()[k], v) for k, v in c.tensors().items())
    assert back.metadata == c.metadata
    assert torch.equal(back.token_ori, c.token_lf + c.token_hf)
    assert os.listdir(tmp_path / "sub") == ["c.safetensors"]  # no temporary file left behind


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "c.safetensors")
    cio.save(make(seed=1), path)
    before = open(path, "rb").read()
    bad = make(seed=2)
    bad.token_hf[0] = float("nan")
    with pytest.raises(cio.ConceptError, match="^" + re.escape(  # the message names the file being written
            f"{path}: tensor token.hf holds NaN or infinite values; the training that wrote it diverged. Use an "
            f"earlier save or retrain with a lower learning rate.") + "$"):
        cio.save(bad, path)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["c.safetensors"]


def test_save_keeps_the_training_state_unless_told_not_to(tmp_path):
    c = make()
    c.training_state = {"step": torch.tensor([7.0])}
    path = str(tmp_path / "c.safetensors")
    assert torch.equal(cio.load(cio.save(c, path)).training_state["step"], torch.tensor([7.0]))  # the default: kept
    assert cio.load(cio.save(c, path, with_training_state=False)).training_state == {}


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(cio.ConceptError, match="does not exist"):
        cio.load(str(tmp_path / "none.safetensors"))
    path = str(tmp_path / "c.safetensors")
    cio.save(make(), path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(cio.ConceptError, match="cannot read concept file .* truncated"):
        cio.load(path)


def test_foreign_and_future_files_are_named(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    save_file({"x": torch.zeros(2)}, path)
    with pytest.raises(cio.ConceptError, match="not an EqDiff concept"):
        cio.load(path)
    c = make()
    save_file({k: v.contiguous() for k, v in c.tensors().items()}, path,
              metadata={"eqdiff_format": "99", "eqdiff_metadata": json.dumps({})})
    with pytest.raises(cio.ConceptError, match="format 99; .* reads format 1"):
        cio.load(path)


def test_nan_in_file_is_rejected_on_load(tmp_path):
    c = make()
    tensors = {k: v.clone().contiguous() for k, v in c.tensors().items()}
    tensors["rra.output.1.0.h_r.bias"][0] = float("inf")
    path = str(tmp_path / "c.safetensors")
    save_file(tensors, path, metadata={"eqdiff_format": "1", "eqdiff_metadata": "{}"})
    with pytest.raises(cio.ConceptError, match="^" + re.escape(  # the message names the file read
            f"{path}: tensor rra.output.1.0.h_r.bias holds NaN or infinite values; the training that wrote it "
            f"diverged. Use an earlier save or retrain with a lower learning rate.") + "$"):
        cio.load(path)


def test_inconsistent_rra_shapes_are_rejected():
    c = make()
    c.rra["output.1.0"]["h_r.weight"] = torch.zeros(16, 32)
    with pytest.raises(cio.ConceptError, match="^" + re.escape(  # no source given: "concept"
            "concept: RRA layer output.1.0 h_r.weight has shape (16, 32), expected (17, 32)") + "$"):
        cio.validate(c)
    c = make()
    c.rra["output.1.0"]["to_k_res"] = torch.zeros(16, 8)  # the width is to_k_res' rows, as the other shapes say
    with pytest.raises(cio.ConceptError, match="^" + re.escape(
            "concept: RRA layer output.1.0 to_k_res has shape (16, 8), expected (16, 16)") + "$"):
        cio.validate(c)


def test_fingerprint_hashes_float32_values_without_the_training_state():
    """By hand (hashlib, numpy): sha256 over the sorted tensor names, each followed by its values as float32
    bytes, first 16 hex digits. A bfloat16 concept (numpy has no bfloat16) hashes as its float32 values; the
    optimiser state is not part of the concept."""
    c = cio.Concept(torch.tensor([1.0, -2.0], dtype=torch.bfloat16), torch.tensor([0.5, 3.0], dtype=torch.bfloat16),
                    training_state={"step": torch.tensor([7.0])})
    want = hashlib.sha256(b"token.hf" + np.array([0.5, 3.0], np.float32).tobytes()
                          + b"token.lf" + np.array([1.0, -2.0], np.float32).tobytes()).hexdigest()[:16]
    assert c.fingerprint() == want


@pytest.mark.cuda
def test_fingerprint_of_a_cuda_concept_is_the_cpu_one():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    lf, hf = torch.randn(24), torch.randn(24)
    assert cio.Concept(lf.cuda(), hf.cuda()).fingerprint() == cio.Concept(lf, hf).fingerprint()


def test_check_fits_names_the_mismatch():
    c = make()
    shapes = {k: s for k, s in KV.items()}
    cio.check_fits(c, 24, shapes, DIMS)
    with pytest.raises(cio.ConceptError, match="24-d token embeddings; this model's text encoder is 768-d"):
        cio.check_fits(c, 768, shapes, DIMS)
    with pytest.raises(cio.ConceptError, match=r"is \(16, 24\) in the concept and \(32, 24\) in this model"):
        cio.check_fits(c, 24, {k: (32, 24) for k in KV}, DIMS)
    with pytest.raises(cio.ConceptError, match="RRA layer at middle.0.0, which this model does not have"):
        cio.check_fits(c, 24, shapes, {"output.1.0": 16})
    with pytest.raises(cio.ConceptError, match="output.1.0 is 16 wide, this model's self-attention there is 8"):
        cio.check_fits(c, 24, shapes, {"output.1.0": 8, "middle.0.0": 16})


def test_check_fits_messages_name_the_base_model_or_say_sd1():
    """The exact messages: the hint names metadata's base_model, else 'an SD1.x checkpoint'."""
    c = make()
    want = ("concept 'testconcept' has 24-d token embeddings; this checkpoint's text encoder is 768-d. Apply it to "
            "the model it was trained on (eqdiff_tiny_sd15) or retrain it for this checkpoint.")
    with pytest.raises(cio.ConceptError, match="^" + re.escape(want) + "$"):
        cio.check_fits(c, 768, dict(KV), DIMS, model_name="this checkpoint")
    del c.metadata["base_model"]
    want = ("concept 'testconcept' has an RRA layer at middle.0.0, which this model does not have (its "
            "self-attention layers: input.4.1, output.1.0). Apply it to the model it was trained on (an SD1.x "
            "checkpoint) or retrain it for this model.")
    with pytest.raises(cio.ConceptError, match="^" + re.escape(want) + "$"):
        cio.check_fits(c, 24, dict(KV), {"output.1.0": 16, "input.4.1": 8})


def test_every_validation_error_names_the_source_and_the_problem(tmp_path):
    c = make()
    c.token_hf = torch.zeros(23)
    with pytest.raises(cio.ConceptError, match=r"^src: token.lf and token.hf must be two vectors of one width, "
                                               r"got \(24,\) and \(23,\)"):
        cio.validate(c, "src")
    c = make()
    del c.rra["middle.0.0"]["to_v_res"], c.rra["middle.0.0"]["h_r.bias"]
    with pytest.raises(cio.ConceptError, match=r"^src: RRA layer middle.0.0 lacks to_v_res, h_r.bias$"):
        cio.validate(c, "src")
    c = make()
    c.reference_context = torch.zeros(77, 23)
    with pytest.raises(cio.ConceptError, match=r"^src: reference_context must be \(tokens, 24\), got \(77, 23\)"):
        cio.validate(c, "src")
    c.reference_context = torch.zeros(77)
    with pytest.raises(cio.ConceptError, match="reference_context must be"):
        cio.validate(c, "src")
    c.reference_context = None
    assert cio.validate(c, "src") is c  # no reference context is allowed
    c.training_state = {"exp_avg": torch.tensor([0.0, float("nan")])}  # the optimiser state is checked too
    with pytest.raises(cio.ConceptError, match="^" + re.escape(
            "src: tensor train.exp_avg holds NaN or infinite values; the training that wrote it diverged. Use an "
            "earlier save or retrain with a lower learning rate.") + "$"):
        cio.validate(c, "src")
    with pytest.raises(cio.ConceptError, match="concept 'testconcept' changes diffusion_model.x, which this model"):
        cio.check_fits(random_concept({"diffusion_model.x": (2, 2)}, {}, token_dim=24), 24, {}, {})


def test_bad_metadata_missing_tokens_and_unknown_rra_tensors(tmp_path):
    path = str(tmp_path / "c.safetensors")
    tensors = {"token.lf": torch.zeros(4), "token.hf": torch.zeros(4)}
    save_file(tensors, path, metadata={"eqdiff_format": str(cio.FORMAT_VERSION), "eqdiff_metadata": "{not json"})
    with pytest.raises(cio.ConceptError, match=r"c.safetensors: its metadata is not valid JSON"):
        cio.load(path)
    save_file({"token.lf": torch.zeros(4)}, path, metadata={"eqdiff_format": str(cio.FORMAT_VERSION)})
    with pytest.raises(cio.ConceptError, match="lacks the token embeddings token.lf / token.hf"):
        cio.load(path)
    save_file({**tensors, "rra.output.1.0.bogus": torch.zeros(1)}, path,
              metadata={"eqdiff_format": str(cio.FORMAT_VERSION)})
    with pytest.raises(cio.ConceptError, match=r"unknown RRA tensor rra.output.1.0.bogus"):
        cio.load(path)
    save_file(tensors, path, metadata={"eqdiff_format": str(cio.FORMAT_VERSION)})
    loaded = cio.load(path)  # no metadata entry: an empty dict; no kv, rra or reference context
    assert loaded.metadata == {} and loaded.kv_deltas == {} and loaded.rra == {} and loaded.reference_context is None
