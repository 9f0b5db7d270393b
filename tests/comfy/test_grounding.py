"""Grounding Models Loader and Grounded Mask in-process, on GroundingDINO and SAM checkpoints written
by the original libraries (tests/grounding_factory.py) and loaded through the pack's loader.

Runs under transformers 4.x (.comfy/venv) and 5.x (the .comfy/tf5 overlay, see scripts/test.sh). The
checkpoints are always built with the 4.x venv in a subprocess, since groundingdino-py needs it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfy_env import REPO
from comfy_runs import progress_reports
from eqdiff_core import grounding as core
from grounding_files import assert_matches_reference, factory_files, reference

FACTORY = REPO / "tests" / "grounding_factory.py"
DEFAULTS = dict(prompt="cat . red dog", box_threshold=0.3, text_threshold=0.25, boxes="all", dilate=0, feather=0.0,
                detect_size=128)


# -- no network ----------------------------------------------------------------------------------
class NetworkAccess(AssertionError):
    pass


def _local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX
        return True
    host = str(address[0])
    return host in ("localhost", "::1") or host.startswith("127.")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fails the test on any attempt to reach another host (connect or name lookup)."""
    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def connect(self, address):
        if not _local(address):
            raise NetworkAccess(f"network access attempted: connect to {address}")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not _local(address):
            raise NetworkAccess(f"network access attempted: connect to {address}")
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in (None, "localhost") and not str(host).startswith("127.") and host != "::1":
            raise NetworkAccess(f"network access attempted: name lookup of {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # offline mode must not be what keeps us off the network
    yield


def test_network_guard_catches_connections():
    with pytest.raises(NetworkAccess):
        socket.create_connection(("10.255.255.1", 80), timeout=0.1)
    with pytest.raises(NetworkAccess):
        socket.getaddrinfo("huggingface.co", 443)


# -- checkpoints from the original libraries -----------------------------------------------------
@pytest.fixture(scope="session")
def files() -> Path:
    """Small original-format checkpoints, a BERT folder, reference outputs and real-size shapes."""
    return factory_files()


@pytest.fixture(scope="session")
def folders(files, registered_nodes):
    import folder_paths

    for name in ("grounding-dino", "sams"):
        folder_paths.add_model_folder_path(name, str(files / name))
    return files


@pytest.fixture(scope="session")
def loader(registered_nodes):
    return registered_nodes["EqDiffGroundingLoader"]


@pytest.fixture(scope="session")
def mask_node(registered_nodes):
    return registered_nodes["EqDiffGroundedMask"]


@pytest.fixture(scope="session")
def models(folders, loader):
    with torch.inference_mode():
        return loader.execute(grounding_dino="tiny_swint.pth", sam="tiny_vit.safetensors", device="auto",
                              precision="auto").result[0]


def run(node, models, image, **overrides):
    with torch.inference_mode():
        return node.execute(grounding=models, image=image, **{**DEFAULTS, **overrides}).result


def images(b, h=96, w=128, seed=0):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def query_scores(models, batch) -> torch.Tensor:
    """(B, Q): each query's best probability over the prompt's phrase tokens, as the node scores it.
    Random weights put these anywhere in (0, 1), so tests pick thresholds from them."""
    models.load()
    ids, owner = core.tokenize_phrases(models.dino.tokenizer, core.parse_phrases(DEFAULTS["prompt"]))
    rows = []
    for image in batch.movedim(-1, 1):  # one at a time, as the node runs them
        probs, _ = core.dino_forward(models.dino, core.dino_inputs(image[None], DEFAULTS["detect_size"]), ids)
        rows.append(probs[0][:, owner >= 0].max(-1).values.cpu())
    return torch.stack(rows)


# -- folders and loading -------------------------------------------------------------------------
def test_registration_keeps_user_paths_and_other_extensions(registered_nodes, tmp_path):
    import folder_paths

    from comfy_env import pack_module

    user = str(tmp_path / "my-sams")
    folder_paths.add_model_folder_path("sams", user)  # as extra_model_paths.yaml does
    paths, exts = folder_paths.folder_names_and_paths["sams"]
    folder_paths.folder_names_and_paths["sams"] = (paths, set(exts) | {".pt"})  # another pack's extension
    concept_paths, _ = folder_paths.folder_names_and_paths["eqdiff"]
    folder_paths.folder_names_and_paths["eqdiff"] = (concept_paths, {".safetensors", ".ckpt"})
    pack_module("nodes.comfyui.folders").register()
    for name in ("grounding-dino", "sams", "eqdiff", "eqdiff_class_images", "eqdiff_metrics"):
        paths, exts = folder_paths.folder_names_and_paths[name]
        assert os.path.join(folder_paths.models_dir, name) in paths
    for name in ("grounding-dino", "sams"):
        assert {".pth", ".safetensors"} <= folder_paths.folder_names_and_paths[name][1]
    # concept files are safetensors only, whatever another pack registered for the folder
    assert folder_paths.folder_names_and_paths["eqdiff"][1] == {".safetensors"}
    paths, exts = folder_paths.folder_names_and_paths["sams"]
    assert user in paths and ".pt" in exts
    paths.remove(user)


def test_loader_lists_checkpoints_but_not_the_bert_folder(folders, loader):
    options = {i.id: i.options for i in loader.define_schema().inputs}
    assert {"tiny_swint.pth", "tiny_swint.safetensors"} <= set(options["grounding_dino"])
    assert {"tiny_vit.pth", "tiny_vit.safetensors"} <= set(options["sam"])
    assert not [o for o in options["grounding_dino"] if core.BERT_FOLDER in o]
    assert loader.validate_inputs(grounding_dino="tiny_swint.pth", sam="tiny_vit.pth") is True
    with pytest.raises(ValueError, match="device: 'cuda:1' is not one of auto, cpu"):
        loader.execute(grounding_dino="tiny_swint.pth", sam="tiny_vit.pth", device="cuda:1", precision="auto")


def test_loader_reads_variants_from_weights_and_uses_model_management(models):
    import comfy.model_patcher

    assert models.dino.spec.variant == "Swin-T" and models.dino.spec.num_queries == 12
    assert models.dino.spec.decoder_layers == 2 and models.dino.spec.encoder_ffn_dim == 512
    assert models.sam.spec.global_attn_indexes == [1] and models.sam.spec.hidden_size == 64
    assert isinstance(models.dino_patcher, comfy.model_patcher.ModelPatcher)
    assert isinstance(models.sam_patcher, comfy.model_patcher.ModelPatcher)
    assert "Swin-T" in models.describe()


def test_pth_and_safetensors_load_the_same_weights(folders, loader):
    with torch.inference_mode():
        a = loader.execute(grounding_dino="tiny_swint.safetensors", sam="tiny_vit.pth", device="cpu",
                           precision="float32").result[0]
    b_state = dict(a.dino.model.state_dict())
    ref = core.read_checkpoint(folders / "grounding-dino" / "tiny_swint.pth")
    assert torch.equal(b_state["model.level_embed"], ref["transformer.level_embed"])
    assert vars(a.sam.spec) == vars(core.sam_spec(core.read_checkpoint(folders / "sams" / "tiny_vit.safetensors")))


def test_outputs_match_the_original_implementations(folders, models):
    """The models as the loader node gives them (its device and dtype choice, model management)."""
    models.load()
    assert_matches_reference(core, models.dino, models.sam, reference(folders))


# -- the mask node -------------------------------------------------------------------------------
def test_mask_shapes_and_batch_alignment(mask_node, models):
    batch = images(2)
    ranked = query_scores(models, batch)[1].sort().values
    threshold = (ranked[-3].item() + ranked[-4].item()) / 2  # three boxes on the second image
    mask, preview, report = run(mask_node, models, batch, box_threshold=threshold, text_threshold=0.0)
    assert mask.shape == (2, 96, 128) and mask.dtype == torch.float32
    assert preview.shape == (2, 96, 128, 3) and 0 <= preview.min() and preview.max() <= 1
    assert len(report.splitlines()) == 2
    assert report.splitlines()[1].startswith("image 1: 3 box(es)") and mask[1].sum() > 0
    assert not torch.equal(mask[0], mask[1])
    rgba_second = torch.cat([batch[1:], torch.ones(1, 96, 128, 1)], -1)
    alone, _, _ = run(mask_node, models, rgba_second, box_threshold=threshold, text_threshold=0.0)  # nothing shifts
    assert torch.equal(alone[0], mask[1])


def test_no_detection_gives_empty_masks_and_a_warning(mask_node, models, caplog):
    batch = images(2, seed=1)
    with caplog.at_level(logging.WARNING):
        mask, preview, report = run(mask_node, models, batch, box_threshold=1.0)
    assert mask.shape == (2, 96, 128) and mask.sum() == 0
    assert report.count("nothing found") == 2
    assert "nothing found" in caplog.text
    frame = torch.ones(96, 128, dtype=torch.bool)
    frame[4:-4, 4:-4] = False
    assert (preview[:, frame] == torch.tensor([1.0, 0.0, 0.0])).all()  # a red frame, 4 px on every side
    assert torch.equal(preview[:, ~frame], batch[:, ~frame])  # inside it the photo, with nothing tinted


def test_only_the_image_without_detection_is_empty(mask_node, models):
    batch = images(2, seed=2)
    scores = query_scores(models, batch).max(-1).values.tolist()
    low = min(range(2), key=scores.__getitem__)
    threshold = sum(scores) / 2
    assert abs(scores[0] - scores[1]) > 1e-5, scores
    mask, _, report = run(mask_node, models, batch, box_threshold=threshold, text_threshold=0.0)
    lines = report.splitlines()
    assert "nothing found" in lines[low] and mask[low].sum() == 0
    assert "nothing found" not in lines[1 - low] and mask[1 - low].sum() > 0


@pytest.mark.parametrize("boxes", ["all", "best"])
def test_higher_threshold_never_grows_the_mask(mask_node, models, boxes):
    batch = images(1, seed=3)
    scores = query_scores(models, batch)[0].sort().values
    previous, areas = None, []
    for t in (scores[4].item(), scores[-2].item(), scores[-1].item(), 1.0):
        mask = run(mask_node, models, batch, box_threshold=t, text_threshold=0.0, boxes=boxes, dilate=2,
                   feather=1.0)[0]
        if previous is not None:
            assert (mask <= previous + 1e-6).all(), f"mask grew at box_threshold {t}"
        previous = mask
        areas.append(mask.sum().item())
    assert areas[0] > areas[-1] == 0
    text = [run(mask_node, models, batch, box_threshold=0.0, text_threshold=t, boxes=boxes)[0]
            for t in (scores[2].item(), scores[-1].item())]
    assert all((b <= a).all() for a, b in zip(text, text[1:]))
    # a box is kept when its score reaches both thresholds: either threshold alone selects the same boxes
    for t, by_text in zip((scores[2].item(), scores[-1].item()), text):
        assert torch.equal(by_text, run(mask_node, models, batch, box_threshold=t, text_threshold=0.0, boxes=boxes)[0])
    report = run(mask_node, models, batch, box_threshold=0.0, text_threshold=0.0, boxes=boxes)[2]
    found = int(report.split(": ")[1].split(" ")[0])
    assert found == 1 if boxes == "best" else found == len(scores)  # every query reaches 0


def test_dilate_and_feather(mask_node, models):
    batch = images(1, seed=4)
    best = dict(box_threshold=0.0, text_threshold=0.0, boxes="best")
    base = run(mask_node, models, batch, **best)[0]
    assert 0 < base.sum() < base.numel()
    grown = run(mask_node, models, batch, **best, dilate=3, feather=2.0)[0]
    assert set(base.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(grown, core.refine_mask(base, 3, 2.0))
    assert ((grown > 0) & (grown < 1)).any() and (grown[base > 0] > 0.5).all() and grown.sum() > base.sum()


def test_progress_and_interruption(mask_node, models):
    import comfy.model_management as mm

    with progress_reports() as calls:
        run(mask_node, models, images(2), box_threshold=1.0)
    assert calls == [(1, 2), (2, 2)]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(mask_node, models, images(2), box_threshold=1.0)
    finally:
        mm.interrupt_current_processing(False)


def test_bad_inputs_name_the_input(mask_node, models):
    assert "prompt" in mask_node.validate_inputs(prompt=" . , ")
    assert mask_node.validate_inputs(prompt="dog") is True
    with pytest.raises(ValueError, match="boxes: 'most' is not one of all, best"):
        run(mask_node, models, images(1), boxes="most")
    with pytest.raises(ValueError, match="grounding"):
        run(mask_node, object(), images(1))
    with pytest.raises(ValueError, match="image"):
        run(mask_node, models, torch.rand(1, 8, 8, 1))


# -- missing and corrupt files -------------------------------------------------------------------
def test_missing_file_names_the_folder(folders, loader, tmp_path, monkeypatch):
    import folder_paths

    with pytest.raises(ValueError, match=r"grounding_dino: 'nope.pth' is not in .*grounding-dino"):
        loader.execute(grounding_dino="nope.pth", sam="tiny_vit.pth", device="cpu", precision="auto")
    with pytest.raises(ValueError, match=r"sam: 'nope.pth' is not in .*sams"):
        loader.execute(grounding_dino="tiny_swint.pth", sam="nope.pth", device="cpu", precision="auto")
    assert loader.validate_inputs(grounding_dino="tiny_swint.pth", sam="tiny_vit.pth") is True
    empty = tmp_path / "no-sams"
    empty.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sams", ([str(empty)], {".pth", ".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    assert loader.validate_inputs(grounding_dino="tiny_swint.pth", sam="tiny_vit.pth") == \
        f"sam: no .pth or .safetensors file in {empty}; put the original checkpoint there and refresh."


def test_a_checkpoint_replaced_under_its_name_is_loaded_again(folders, extra_folder, loader):
    import shutil

    copy = extra_folder / "sams" / "replaced.safetensors"
    shutil.copy(folders / "sams" / "tiny_vit.safetensors", copy)

    def load():
        return loader.execute(grounding_dino="tiny_swint.pth", sam="replaced.safetensors", device="cpu",
                              precision="auto").result[0].sam

    first = load()
    assert load() is first  # unchanged: the loaded model is reused
    os.utime(copy, (1, 1))
    assert load() is not first


@pytest.fixture
def extra_folder(folders, tmp_path):
    import folder_paths

    for name in ("grounding-dino", "sams"):
        (tmp_path / name).mkdir()
        folder_paths.add_model_folder_path(name, str(tmp_path / name))
    yield tmp_path
    for name in ("grounding-dino", "sams"):
        folder_paths.folder_names_and_paths[name][0].remove(str(tmp_path / name))


def test_corrupt_and_wrong_files_are_clear_errors(folders, extra_folder, loader):
    good = (folders / "grounding-dino" / "tiny_swint.pth").read_bytes()
    (extra_folder / "grounding-dino" / "truncated.pth").write_bytes(good[: len(good) // 3])
    (extra_folder / "grounding-dino" / "page.pth").write_bytes(b"<!DOCTYPE html><html>Not found</html>")
    (extra_folder / "grounding-dino" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    shutil.copy(folders / "sams" / "tiny_vit.pth", extra_folder / "grounding-dino" / "sam_in_wrong_folder.pth")
    cases = {"truncated.pth": "cannot be read as weights", "page.pth": "HTML page",
             "broken.safetensors": "cannot be read as weights", "sam_in_wrong_folder.pth": "looks like a SAM checkpoint"}
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            loader.execute(grounding_dino=name, sam="tiny_vit.pth", device="cpu", precision="auto")


def test_pickled_code_is_never_run(folders, extra_folder, loader, tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {"x": torch.zeros(1)}, "extra": Payload()}, extra_folder / "sams" / "evil.pth")
    with pytest.raises(ValueError, match="cannot be read as weights"):
        loader.execute(grounding_dino="tiny_swint.pth", sam="evil.pth", device="cpu", precision="auto")
    assert not marker.exists()


def test_missing_bert_folder_says_where_and_what(folders, extra_folder, loader):
    import folder_paths

    shutil.copy(folders / "grounding-dino" / "tiny_swint.safetensors", extra_folder / "grounding-dino" / "nobert.safetensors")
    paths = folder_paths.folder_names_and_paths["grounding-dino"][0]
    saved = paths[:]
    paths[:] = [str(extra_folder / "grounding-dino")]  # the only grounding-dino folder: it has no BERT
    try:
        with pytest.raises(ValueError) as err:
            loader.execute(grounding_dino="nobert.safetensors", sam="tiny_vit.pth", device="cpu", precision="auto")
    finally:
        paths[:] = saved
    msg = str(err.value)
    assert "config.json" in msg and "vocab.txt" in msg and core.BERT_FOLDER in msg
    assert str(extra_folder / "grounding-dino") in msg and folder_paths.models_dir in msg


# -- real sizes on the GPU -----------------------------------------------------------------------
def _write_bert_base(folder: Path) -> None:
    """bert-base-uncased's config.json and a vocabulary with its special-token ids (the weights are
    inside the GroundingDINO files)."""
    from transformers import BertConfig

    folder.mkdir(parents=True, exist_ok=True)
    vocab = [f"[unused{i}]" for i in range(30522)]
    for token, idx in {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029,
                       "dog": 2000, "red": 2001, "cat": 2002}.items():
        vocab[idx] = token
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "config.json").write_text(BertConfig().to_json_string())


@pytest.mark.cuda
def test_precision_float32_keeps_sam_in_float32_on_the_gpu(folders, loader):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with torch.inference_mode():
        full, half = (loader.execute(grounding_dino="tiny_swint.pth", sam="tiny_vit.safetensors", device="auto",
                                     precision=p).result[0] for p in ("float32", "auto"))
    assert next(full.sam.model.parameters()).dtype == torch.float32
    assert next(half.sam.model.parameters()).dtype in (torch.bfloat16, torch.float16)
    assert next(half.dino.model.parameters()).dtype == torch.float32  # GroundingDINO: always float32


@pytest.mark.cuda
def test_cuda_real_size_variants_load_and_run(registered_nodes, tmp_path_factory):
    """Every supported real-size variant with random weights, saved as the released .pth files are
    (GroundingDINO as {"model": ...}; one SAM as .safetensors), loaded through the loader node on CUDA
    (SAM in half precision) and run on a batch of 512x512 images. The keys and shapes come from the
    original libraries' builders (tests/grounding_factory.py --real-shapes, run here with the 4.x venv,
    or given as EQDIFF_GROUNDING_REAL_SHAPES where those libraries are not installed)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import folder_paths
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("grounding-real")
    manifest = os.environ.get("EQDIFF_GROUNDING_REAL_SHAPES")
    if manifest is None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        done = subprocess.run([sys.executable, str(FACTORY), str(out), "--real-shapes", "--no-small"], env=env,
                              capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-4000:]
        manifest = out / "real_shapes.json"
    shapes = json.loads(Path(manifest).read_text())
    gen = torch.Generator().manual_seed(0)
    for name, keys in shapes.items():
        state = {}
        for key, (shape, dtype) in keys.items():
            if dtype == "torch.float32":
                state[key] = torch.randn(shape, generator=gen) * 0.02
                if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight")):
                    state[key] += 1.0
            else:
                state[key] = torch.zeros(shape, dtype=getattr(torch, dtype.split(".")[1]))
        folder = out / ("grounding-dino" if name.startswith("grounding") else "sams")
        folder.mkdir(exist_ok=True)
        if name == "sam_vit_l":
            save_file(state, str(folder / f"{name}.safetensors"))
        else:
            torch.save({"model": state} if name.startswith("grounding") else state, folder / f"{name}.pth")
        del state
    _write_bert_base(out / "grounding-dino" / core.BERT_FOLDER)
    for name in ("grounding-dino", "sams"):
        folder_paths.add_model_folder_path(name, str(out / name), is_default=True)
    loader, node = registered_nodes["EqDiffGroundingLoader"], registered_nodes["EqDiffGroundedMask"]
    variants = {"groundingdino_swint_ogc.pth": "Swin-T", "groundingdino_swinb_cogcoor.pth": "Swin-B",
                "sam_vit_h.pth": "ViT-H", "sam_vit_l.safetensors": "ViT-L", "sam_vit_b.pth": "ViT-B"}
    batch = torch.rand(2, 512, 512, 3, generator=gen)
    for dino_name, sam_name in (("groundingdino_swint_ogc.pth", "sam_vit_h.pth"),
                                ("groundingdino_swinb_cogcoor.pth", "sam_vit_l.safetensors"),
                                ("groundingdino_swint_ogc.pth", "sam_vit_b.pth")):
        with torch.inference_mode():
            models = loader.execute(grounding_dino=dino_name, sam=sam_name, device="auto", precision="auto").result[0]
            assert models.dino.spec.variant == variants[dino_name] and models.sam.spec.variant == variants[sam_name]
            mask, preview, report = node.execute(grounding=models, image=batch, **{
                **DEFAULTS, "detect_size": 800, "box_threshold": 0.0, "text_threshold": 0.0}).result
        assert next(models.dino.model.parameters()).device.type == "cuda"
        assert next(models.sam.model.parameters()).dtype in (torch.float16, torch.bfloat16)
        assert mask.shape == (2, 512, 512) and preview.shape == (2, 512, 512, 3) and torch.isfinite(mask).all()
        assert "nothing found" not in report


def test_runs_under_the_transformers_line_asked_for():
    """scripts/test.sh runs this file under 4.x and again under 5.x; this checks which one is live."""
    import transformers

    major = transformers.__version__.split(".")[0]
    assert major == os.environ.get("EQDIFF_EXPECT_TRANSFORMERS", major) and major in ("4", "5"), transformers.__version__
