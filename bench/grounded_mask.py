"""Benchmark of Grounded Mask's models: seconds per image and peak memory, GroundingDINO Swin-T +
SAM ViT-H with random weights, a batch of 512x512 images, as the node runs them.

    python bench/grounded_mask.py                      real sizes, on CUDA if present (else CPU)
    python bench/grounded_mask.py --small --device cpu smoke test: small models, small images

Prints one JSON object. The models are transformers' GroundingDinoForObjectDetection and SamModel
built from the architectures our loader reads from the original checkpoints (bert-base text encoder,
a synthetic bert-base-uncased-shaped vocabulary); nothing is downloaded. GroundingDINO runs in float32,
SAM in bfloat16 on CUDA (float16 where bf16 is missing), as the node's 'auto' precision.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eqdiff_core import grounding as g  # noqa: E402

SPECIAL = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}


def tokenizer(folder: Path, vocab_size: int):
    from transformers import BertTokenizerFast

    vocab = [f"[unused{i}]" for i in range(vocab_size)]
    for token, idx in SPECIAL.items():
        vocab[idx] = token
    for i, word in enumerate(["dog", "cat", "backpack", "red"]):
        vocab[2000 + i] = word
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def build(small: bool, device: str, folder: Path):
    from transformers import GroundingDinoForObjectDetection, SamModel

    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64) if small else {}
    dino_spec = g.DinoSpec("Swin-T", 96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 256, 1 if small else 6, 2 if small else 6,
                           512 if small else 2048, 512 if small else 2048, 30 if small else 900, 4,
                           text.get("hidden_size", 768), text.get("num_hidden_layers", 12), 30522, True)
    sam_spec = (g.SamSpec("small", 64, 2, 2, 256, 14, [1], 1024, 16, 256) if small else
                g.SamSpec("ViT-H", 1280, 32, 16, 5120, 14, [7, 15, 23, 31], 1024, 16, 256))
    sam_dtype = torch.float32
    if device == "cuda":
        sam_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with torch.device(device):
        dino = GroundingDinoForObjectDetection(dino_spec.config({"vocab_size": 30522, **text})).eval()
        sam = SamModel(sam_spec.config()).eval().to(sam_dtype)
    return (g.GroundingDino(dino.requires_grad_(False), tokenizer(folder, 30522), dino_spec),
            g.Sam(sam.requires_grad_(False), sam_spec), sam_dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="small models and 128 px images (CPU smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--detect-size", type=int, default=800)
    a = parser.parse_args()
    if a.small:
        a.size, a.batch, a.iters, a.detect_size = min(a.size, 128), min(a.batch, 2), 1, 128
    cuda = a.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        dino, sam, sam_dtype = build(a.small, a.device, Path(tmp))
        build_s = time.perf_counter() - t0
    images = torch.rand(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run():
        with torch.inference_mode():
            return g.grounded_masks(dino, sam, images, "dog . red backpack", 0.0, 0.0, best_only=True,
                                    detect_size=a.detect_size)

    masks, _ = run()  # warm-up
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        masks, dets = run()
        sync()
        times.append(time.perf_counter() - t0)
    best = min(times)
    result = {
        "benchmark": "grounded_mask", "models": "small" if a.small else "GroundingDINO Swin-T + SAM ViT-H",
        "device": a.device, "gpu": torch.cuda.get_device_name() if cuda else None,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "batch": a.batch, "size": a.size,
        "detect_size": a.detect_size, "boxes_per_image": 1, "dino_dtype": "float32", "sam_dtype": str(sam_dtype),
        "build_s": round(build_s, 2), "s_per_batch": round(best, 4), "s_per_image": round(best / a.batch, 4),
        "runs_s": [round(t, 4) for t in times], "mask_shape": list(masks.shape),
        "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda
        else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "process max RSS",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
