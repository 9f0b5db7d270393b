"""Class Images (prior preservation) on the tiny checkpoint: sampled once, kept, extended, resumable."""

import os

import pytest
import torch

from comfy_env import pack_module, use_comfy
from comfy_runs import progress_reports

use_comfy()
SETTINGS = dict(class_prompt="dog", size=64, seed=3, steps=2, cfg=5.0, batch_size=2)


@pytest.fixture
def node(registered_nodes, tmp_path):
    import folder_paths

    folder_paths.add_model_folder_path("eqdiff_class_images", str(tmp_path), is_default=True)
    yield registered_nodes["EqDiffClassImages"]
    folder_paths.folder_names_and_paths["eqdiff_class_images"][0].remove(str(tmp_path))


def run(node, tiny, count, **overrides):
    model, clip, vae = tiny
    with torch.inference_mode():
        return node.execute(model=model, clip=clip, vae=vae, count=count, **{**SETTINGS, **overrides}).args[0]


def cached_files(tmp_path):
    return sorted(p for p in tmp_path.rglob("*.png"))


def test_images_are_made_once_then_reused_and_extended(node, tiny, tmp_path):
    first = run(node, tiny, 3)
    assert first.shape == (3, 64, 64, 3) and first.std() > 0
    files = cached_files(tmp_path)
    assert [p.name for p in files] == ["00000.png", "00001.png", "00002.png"]
    stamps = [os.stat(p).st_mtime_ns for p in files]
    again = run(node, tiny, 3)
    assert torch.equal(again, first) and [os.stat(p).st_mtime_ns for p in files] == stamps  # nothing sampled
    more = run(node, tiny, 5)
    assert torch.equal(more[:3], first) and len(cached_files(tmp_path)) == 5
    assert [os.stat(p).st_mtime_ns for p in files] == stamps


def test_image_i_depends_only_on_the_settings_and_i(node, tiny, tmp_path):
    """A cache made in batches of 2 equals one made in batches of 1; another prompt or seed is a new folder."""
    in_pairs = run(node, tiny, 3)
    for p in cached_files(tmp_path):
        p.unlink()
    one_by_one = run(node, tiny, 3, batch_size=1)
    assert (one_by_one - in_pairs).abs().max() < 2 / 255  # batched convolutions round differently
    run(node, tiny, 1, class_prompt="cat")
    next_seed = run(node, tiny, 1, seed=SETTINGS["seed"] + 1)
    assert len({p.parent for p in cached_files(tmp_path)}) == 3
    assert (next_seed[0] - in_pairs[1]).abs().max() < 2 / 255  # image i is sampled from noise seed + i


def test_a_stopped_run_keeps_what_it_made(node, tiny, tmp_path):
    """Stopped in its second batch, a run keeps the first batch's images; the next run samples only the
    missing ones, and its progress bar (in image-steps) reaches its end."""
    import comfy.model_management as mm

    steps, batch = SETTINGS["steps"], SETTINGS["batch_size"]

    def stop_in_second_batch(value, total):
        if value > steps * batch:
            mm.interrupt_current_processing(True)

    try:
        with progress_reports(stop_in_second_batch) as seen, pytest.raises(mm.InterruptProcessingException):
            run(node, tiny, 4)
    finally:
        mm.interrupt_current_processing(False)
    assert seen[:steps + 1] == [(batch * (i + 1), 4 * steps) for i in range(steps + 1)]  # a batch's step: its images
    assert [p.name for p in cached_files(tmp_path)] == ["00000.png", "00001.png"]
    with progress_reports() as seen:
        assert run(node, tiny, 4).shape[0] == 4 and len(cached_files(tmp_path)) == 4
    assert seen == [(batch * (i + 1), 2 * steps) for i in range(steps)]  # two images were missing


def test_an_empty_prompt_is_refused(node):
    assert "class_prompt" in node.validate_inputs(class_prompt="  ")


def test_the_cache_key_follows_the_weights_the_model_computes_with(tiny, registered_nodes, tiny_shapes):
    """A concept (or a LoRA) on the MODEL changes the images, so it changes the folder."""
    from concept_factory import random_concept

    prior = pack_module("nodes.prior")
    model, clip, _ = tiny
    plain = prior.cache_folder(model, "dog", 64, 0, 2, 5.0)
    with torch.inference_mode():
        patched = registered_nodes["EqDiffApplyConcept"].execute(model, clip, random_concept(*tiny_shapes), 1.0,
                                                                 "").args[0]
    assert prior.cache_folder(patched, "dog", 64, 0, 2, 5.0) != plain
    assert prior.cache_folder(model, "dog", 64, 0, 2, 5.0) == plain
    # so does every other setting the images depend on: prompt, size, seed, steps, cfg
    for other in (("cat", 64, 0, 2, 5.0), ("dog", 128, 0, 2, 5.0), ("dog", 64, 1, 2, 5.0), ("dog", 64, 0, 3, 5.0),
                  ("dog", 64, 0, 2, 6.0)):
        assert prior.cache_folder(model, *other) != plain, other
