"""Benchmark of the FDTE trainer: seconds per step, achieved TFLOP/s and peak GPU memory for fp32 and
bf16, with and without gradient checkpointing. SD1.5-architecture UNet with random weights built
through ComfyUI's classes; CLIP-L and the VAE of the built-in tiny checkpoint. A step is the node's
step: batch photos + as many class images, the reference pass, K/V + RRA + embeddings trained.

    .comfy/venv/bin/python bench/train.py [--size 512] [--batch 2] [--steps 20] [--tiny]

Prints one JSON object. Run it on the GPU machine; on a CPU use e.g. --tiny --size 64 --steps 2.
FLOPs are counted once per configuration with torch's FlopCounterMode over a whole step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "scripts"), str(REPO), str(REPO / "bench")]

from comfy_env import PACK_DIR, pack_module, use_comfy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="photos per step (plus as many class images)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint's UNet instead of SD1.5's")
    parser.add_argument("--configs", nargs="+", default=["fp32", "fp32+ckpt", "bf16", "bf16+ckpt"])
    args = parser.parse_args()

    use_comfy()
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import nodes
    from sd15 import build_model

    asyncio.run(nodes.load_custom_node(str(PACK_DIR)))
    comfy_training = pack_module("nodes.comfyui.training")
    training = pack_module("eqdiff_core.training")
    cuda = torch.cuda.is_available()
    tiny_model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("eqdiff_tiny_sd15.safetensors")[:3]
    model = tiny_model if args.tiny else build_model(torch.float16 if cuda else torch.float32)

    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, args.size, args.size, 3, generator=g)
    class_images = torch.rand(8, args.size, args.size, 3, generator=g)
    masks = torch.zeros(4, args.size, args.size)
    masks[:, args.size // 4: 3 * args.size // 4, args.size // 4: 3 * args.size // 4] = 1.0
    settings = training.settings_for("official", resolution=args.size)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    results = {}
    with torch.inference_mode(False):
        start = time.perf_counter()
        data = comfy_training.training_data(model, vae, images, masks, class_images, settings, args.size)
        sync()
        precompute_s = time.perf_counter() - start
        for config in args.configs:
            precision, _, ckpt = config.partition("+")
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            params = comfy_training.initial_parameters(model, clip, settings).to(data.latents.device)
            optimizer = training.make_optimizer(params, 4e-5, settings)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            backend = comfy_training.TrainingBackend(model, clip, params, settings, token="<bench>", class_word="dog",
                                           dtype=dtype, gradient_checkpointing=bool(ckpt))

            def run(first: int, count: int, params=params, backend=backend, optimizer=optimizer):
                training.train(params, backend, data, settings, optimizer, steps=first + count,
                               batch_size=args.batch, seed=0, start_step=first)

            run(0, args.warmup)
            with FlopCounterMode(display=False) as counter:
                run(args.warmup, 1)
            sync()
            start = time.perf_counter()
            run(args.warmup + 1, args.steps)
            sync()
            per_step = (time.perf_counter() - start) / args.steps
            flops = counter.get_total_flops()
            results[config] = {
                "s_per_step": per_step,
                "tflop_per_step": flops / 1e12,
                "achieved_tflops": flops / per_step / 1e12,
                "s_for_600_steps": 600 * per_step,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            }
            del run, backend, params, optimizer  # free this configuration's copies before the next one

    print(json.dumps({
        "benchmark": "train", "size": args.size, "batch_photos": args.batch, "batch_class_images": args.batch,
        "unet": "tiny" if args.tiny else "sd15", "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "timed_steps": args.steps, "precompute_s": precompute_s,
        "trained_parameters": sum(p.numel() for p in comfy_training.initial_parameters(model, clip, settings).parameters()),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
