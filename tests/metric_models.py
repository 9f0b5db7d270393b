"""Tiny random-weight CLIP and DINO folders in Hugging Face format, built with transformers' own
classes and ``save_pretrained`` (what a downloaded openai/clip-vit-base-patch32 or facebook/dino-vits16
folder holds, at a fraction of the size). The CLIP tokenizer is the real CLIP BPE that ComfyUI ships."""

from __future__ import annotations

from pathlib import Path

import torch

from comfy_env import COMFY_DIR

CLIP_BPE = COMFY_DIR / "comfy" / "sd1_tokenizer"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizerFast

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    tokenizer = CLIPTokenizerFast(vocab_file=str(CLIP_BPE / "vocab.json"), merges_file=str(CLIP_BPE / "merges.txt"))
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)  # openai/clip-vit-base-patch32's settings are the defaults
    return folder


def write_tiny_dino(folder: Path, seed: int = 1) -> Path:
    """A ViT with facebook/dino-vits16's preprocessor settings (224 x 224 bilinear, ImageNet statistics)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4)
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}, resample=2, image_mean=IMAGENET_MEAN,
                      image_std=IMAGENET_STD).save_pretrained(folder)
    return folder


def write_tiny_dinov2(folder: Path, seed: int = 2) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(image_size=224, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    Dinov2Model(config).eval().save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, image_mean=IMAGENET_MEAN,
                      image_std=IMAGENET_STD).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    # python tests/metric_models.py FOLDER: FOLDER/clip and FOLDER/dino, e.g. for the figure runner on the tiny models
    import sys

    root = Path(sys.argv[1])
    print(write_tiny_clip(root / "clip"), write_tiny_dino(root / "dino"))
