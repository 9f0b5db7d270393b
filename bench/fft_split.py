"""Benchmark of the FFT split: images per second at 512x512, batch 16, on the CPU and on CUDA.

    python bench/fft_split.py [--batch 16] [--size 512] [--iters 50]

Prints one JSON object. Each configuration is warmed up, then timed over --iters calls with the
device synchronised; the settings are the paper's (circle, complementary, signed, colour) and the
authors' (square, 50/5 bins, grayscale, magnitude).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eqdiff_core import frequency as fq  # noqa: E402

SETTINGS = {
    "paper": dict(low_cutoff=fq.bins_to_cutoff(50), shape="circle", output="signed"),
    "authors": dict(low_cutoff=fq.bins_to_cutoff(50), high_cutoff=fq.bins_to_cutoff(5), shape="square",
                    grayscale=True, output="magnitude"),
}


def time_split(device: str, batch: int, size: int, iters: int, settings: dict) -> dict:
    x = torch.rand(batch, 3, size, size, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        fq.frequency_split(x, **settings)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fq.frequency_split(x, **settings)
    sync()
    seconds = (time.perf_counter() - start) / iters
    return {"ms_per_batch": seconds * 1e3, "ms_per_image": seconds * 1e3 / batch, "images_per_s": batch / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result = {
        "benchmark": "fft_split", "batch": args.batch, "size": args.size, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "results": {},
    }
    for device in devices:
        iters = args.iters if device == "cuda" else max(3, args.iters // 10)
        result["results"][device] = {
            name: time_split(device, args.batch, args.size, iters, s) for name, s in SETTINGS.items()
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
