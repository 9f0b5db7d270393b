"""Writes GroundingDINO and SAM checkpoints in the ORIGINAL repositories' formats, built by the
original libraries (groundingdino-py, segment-anything) with random weights, plus a local BERT
folder and the original implementations' outputs on fixed inputs (tests only).

    python tests/grounding_factory.py OUT_DIR            small models (CPU tests)
    python tests/grounding_factory.py OUT_DIR --real-shapes --no-small
                                                        key shapes of real-size Swin-T, Swin-B, ViT-H/L/B

The pack itself runs these checkpoints through Hugging Face transformers; the original libraries
appear only here, as the independent reference. groundingdino-py needs transformers 4.x, so the
tests run this script with the 4.x venv whatever line they test (``--shapes`` works on meta
tensors: real-size key shapes without memory).

OUT_DIR gets:
  bert/                         config.json, vocab.txt, tokenizer files, model.safetensors
  grounding-dino/tiny_swint.pth         {"model": state_dict}, as the released files
  grounding-dino/tiny_swint.safetensors the same tensors
  sams/tiny_vit.pth, sams/tiny_vit.safetensors
  reference.pt                  inputs and the original models' outputs
  shapes.json                   (--shapes) key -> shape of real-size backbones and SAMs
  real_shapes.json              (--real-shapes) key -> shape, dtype of whole real-size originals
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# ids that bert-base-uncased gives these tokens; GroundingDINO (both implementations) relies on them
SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029, ",": 1010}
WORDS = ["a", "photo", "of", "the", "cat", "dog", "person", "backpack", "red", "car", "tree", "sky", "toy", "shoe"]
CAPTION = "cat . red dog ."


def write_bert(folder: Path, vocab_size: int = 1100, **config) -> None:
    """A BERT folder laid out like bert-base-uncased's: vocab with its special-token ids."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = [f"[unused{i}]" for i in range(vocab_size)]
    for token, idx in SPECIAL_IDS.items():
        vocab[idx] = token
    free = [i for i in range(200, vocab_size) if i not in SPECIAL_IDS.values()]
    for word, idx in zip(WORDS, free):
        vocab[idx] = word
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab_size, **config)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(str(folder), safe_serialization=True)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Every floating parameter moves off its initialiser (zero-initialised heads would hide errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.device.type != "meta":
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def dino_args(bert_dir: Path, backbone: str = "swin_T_224_1k", **overrides):
    import groundingdino
    from groundingdino.util.slconfig import SLConfig

    cfg_dir = Path(groundingdino.__file__).parent / "config"
    name = "GroundingDINO_SwinT_OGC.py" if backbone == "swin_T_224_1k" else "GroundingDINO_SwinB_cfg.py"
    args = SLConfig.fromfile(str(cfg_dir / name))  # the package's own config file
    args.text_encoder_type = str(bert_dir)
    args.device = "cpu"
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def build_dino(args):
    from groundingdino.models import build_model

    model = build_model(args)
    model.eval()
    return model


def save_checkpoint(state: dict, pth: Path, wrap: bool) -> None:
    from safetensors.torch import save_file

    pth.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    torch.save({"model": state} if wrap else state, pth)
    save_file(state, str(pth.with_suffix(".safetensors")))


def small(out: Path) -> None:
    from segment_anything.build_sam import _build_sam
    from groundingdino.util.misc import nested_tensor_from_tensor_list

    bert = out / "bert"
    write_bert(bert, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(1)
    args = dino_args(bert, enc_layers=1, dec_layers=2, num_queries=12, dim_feedforward=512)
    dino = build_dino(args)
    perturb(dino, 1)
    save_checkpoint(dino.state_dict(), out / "grounding-dino" / "tiny_swint.pth", wrap=True)

    torch.manual_seed(2)
    sam = _build_sam(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
    perturb(sam, 2)
    sam.eval()
    save_checkpoint(sam.state_dict(), out / "sams" / "tiny_vit.pth", wrap=False)

    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 160, 224, generator=gen)
    sam_pixels = torch.randn(1, 3, 1024, 1024, generator=gen)
    boxes = torch.tensor([[100.0, 200.0, 600.0, 900.0], [0.0, 0.0, 1023.0, 511.0]])
    with torch.no_grad():
        o = dino(nested_tensor_from_tensor_list(list(pixels)), captions=[CAPTION] * 2)
        emb = sam.image_encoder(sam_pixels)
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        low_res, iou = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=False)
    tokens = dino.tokenizer(CAPTION)["input_ids"]
    torch.save({
        "caption": CAPTION, "pixels": pixels, "dino_probs": o["pred_logits"].sigmoid(), "dino_boxes": o["pred_boxes"],
        "input_ids": torch.tensor(tokens), "sam_pixels": sam_pixels, "sam_boxes": boxes,
        "sam_embeddings": emb, "sam_low_res": low_res, "sam_iou": iou,
    }, out / "reference.pt")


def real_shapes(out: Path) -> None:
    """Key -> [shape, dtype] of every supported real-size original (Swin-T OGC, Swin-B with a
    bert-base text encoder; SAM ViT-H/L/B), for the GPU test, which fills them with random values
    where the original libraries are not installed."""
    from segment_anything import sam_model_registry

    bert = out / "bert-base-real"
    write_bert(bert, vocab_size=30522)
    result = {}
    for name, backbone in (("groundingdino_swint_ogc", "swin_T_224_1k"), ("groundingdino_swinb_cogcoor", "swin_B_384_22k")):
        dino = build_dino(dino_args(bert, backbone))
        result[name] = {k: [list(v.shape), str(v.dtype)] for k, v in dino.state_dict().items()}
        del dino
    with torch.device("meta"):
        for variant in ("vit_h", "vit_l", "vit_b"):
            sam = sam_model_registry[variant]()
            result[f"sam_{variant}"] = {k: [list(v.shape), str(v.dtype)] for k, v in sam.state_dict().items()}
    (out / "real_shapes.json").write_text(json.dumps(result))


def shapes(out: Path) -> None:
    """Key -> shape of the real-size originals (SAM on the meta device, no memory)."""
    from groundingdino.models.GroundingDINO.backbone.swin_transformer import build_swin_transformer
    from segment_anything import sam_model_registry

    result = {}
    with torch.device("meta"):
        for variant in ("vit_h", "vit_l", "vit_b"):
            result[f"sam_{variant}"] = {k: list(v.shape) for k, v in sam_model_registry[variant]().state_dict().items()}
    for backbone, size in (("swin_T_224_1k", 224), ("swin_B_384_22k", 384)):  # its builder calls .item()
        swin = build_swin_transformer(backbone, pretrain_img_size=size, out_indices=(1, 2, 3), dilation=False)
        result[backbone] = {f"backbone.0.{k}": list(v.shape) for k, v in swin.state_dict().items()}
    (out / "shapes.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--real-shapes", action="store_true", help="also write real_shapes.json (GPU test)")
    parser.add_argument("--no-small", action="store_true")
    parser.add_argument("--shapes", action="store_true")
    a = parser.parse_args()
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        sys.exit(f"grounding_factory.py builds with groundingdino-py, which needs transformers 4.x; this Python "
                 f"has {transformers.__version__}. Run it with .comfy/venv/bin/python and no PYTHONPATH overlay.")
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.no_small:
        small(a.out)
    if a.shapes:
        shapes(a.out)
    if a.real_shapes:
        real_shapes(a.out)


if __name__ == "__main__":
    main()
