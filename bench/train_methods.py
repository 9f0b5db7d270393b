"""Benchmark of the trainer options from the related methods: seconds per step with ICO contexts and with
PureCC's loss (each choice of eps_base), as ratios against the plain step of the same run. A step is the
node's step (batch photos + as many class images, the reference pass, K/V + RRA + embeddings trained).

    .comfy/venv/bin/python bench/train_methods.py [--size 64] [--batch 2] [--steps 5] [--tiny]

Prints one JSON object. On a CPU use --tiny --size 64; on the GPU machine the SD1.5-sized UNet (no --tiny)
at 512. The configurations are timed in turn, each after its own warm-up, and the plain step is timed
first and last (its two timings show the machine's drift).
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

CONFIGS = {
    "plain": {},
    "ico_m4_l2": {"ico_prefix_tokens": 4, "ico_suffix_tokens": 2},
    "purecc_trained_base": {"purecc_weight": 2.0, "purecc_base": "trained"},
    "purecc_frozen_base": {"purecc_weight": 2.0, "purecc_base": "frozen"},
    "ico_m4_l2+purecc_trained_base": {"ico_prefix_tokens": 4, "ico_suffix_tokens": 2, "purecc_weight": 2.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="photos per step (plus as many class images)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint's UNet instead of SD1.5's")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()

    use_comfy()
    import torch

    import nodes
    from sd15 import build_model

    asyncio.run(nodes.load_custom_node(str(PACK_DIR)))
    comfy_training = pack_module("nodes.comfyui.training")
    training = pack_module("eqdiff_core.training")
    cuda = torch.cuda.is_available()
    tiny_model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("eqdiff_tiny_sd15.safetensors")[:3]
    model = tiny_model if args.tiny else build_model(torch.float16 if cuda else torch.float32)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    g = torch.Generator().manual_seed(0)
    photos = 4
    images = torch.rand(photos, args.size, args.size, 3, generator=g)
    class_images = torch.rand(8, args.size, args.size, 3, generator=g)
    masks = torch.zeros(photos, args.size, args.size)
    masks[:, args.size // 4: 3 * args.size // 4, args.size // 4: 3 * args.size // 4] = 1.0

    def sync():
        if cuda:
            torch.cuda.synchronize()

    plain_settings = training.settings_for("official", resolution=args.size)
    with torch.inference_mode(False):
        data = comfy_training.training_data(model, vae, images, masks, class_images, plain_settings, args.size)
        # PureCC's extractor: a Stage-1 concept; its values do not change the cost
        stage1 = comfy_training.initial_parameters(model, clip, plain_settings)
        for p in stage1.kv.values():
            p.data.normal_(0, 1e-3, generator=g)
        extractor = stage1.to_concept({"name": "bench_stage1"})
        data.extractor_tokens = torch.stack([extractor.token_lf, extractor.token_hf]).to(data.latents.device)

        def time_config(overrides: dict) -> float:
            settings = training.settings_for("official", resolution=args.size, **overrides)
            params = comfy_training.initial_parameters(model, clip, settings, photos=photos).to(data.latents.device)
            optimizer = training.make_optimizer(params, 4e-5, settings)
            backend = comfy_training.TrainingBackend(model, clip, params, settings, token="<bench>", class_word="dog",
                                                     dtype=dtype, gradient_checkpointing=False,
                                                     extractor=extractor if settings.purecc else None)
            training.train(params, backend, data, settings, optimizer, steps=args.warmup, batch_size=args.batch, seed=0)
            sync()
            start = time.perf_counter()
            training.train(params, backend, data, settings, optimizer, steps=args.warmup + args.steps,
                           batch_size=args.batch, seed=0, start_step=args.warmup)
            sync()
            per_step = (time.perf_counter() - start) / args.steps
            del backend, params, optimizer  # free this configuration's copies before the next one
            return per_step

        seconds = {"plain": time_config(CONFIGS["plain"])}
        for name, overrides in CONFIGS.items():
            if name != "plain":
                seconds[name] = time_config(overrides)
        plain_again = time_config(CONFIGS["plain"])

    plain = (seconds["plain"] + plain_again) / 2
    print(json.dumps({
        "benchmark": "train_methods", "size": args.size, "batch_photos": args.batch,
        "batch_class_images": args.batch, "unet": "tiny" if args.tiny else "sd15", "precision": args.precision,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "timed_steps": args.steps, "plain_s_per_step_first_last": [seconds["plain"], plain_again],
        "results": {name: {"s_per_step": s, "ratio_vs_plain": s / plain, "settings": CONFIGS[name]}
                    for name, s in seconds.items() if name != "plain"},
    }, indent=2))


if __name__ == "__main__":
    main()
