"""Benchmark of sampling: seconds per image for (a) ComfyUI's KSampler (ddim, ddim_uniform) without RRA,
(b) the Equilibrated Sampler with RRA as the authors run it (a reference row per CFG branch, the
reference pass on the base weights), (c) the faster options (one shared reference row; the reference
pass through the MODEL as it is) with the difference they make to the output, (d) the official
settings with the reference-feature cache warm (a repeated run with a new seed), at several batch
sizes, plus peak GPU memory. SD1.5-architecture UNet with random weights, built through ComfyUI's own
classes, with a random concept applied.

    .comfy/venv/bin/python bench/sample.py [--size 512] [--steps 50] [--batches 1 4] [--repeats 2] [--tiny]

Prints one JSON object. Run it on the GPU machine; on a CPU use e.g. --tiny --size 64 --steps 10 (the
tiny checkpoint's UNet: the ratios then show the mechanism's overhead, not SD1.5's).
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
from sd15 import bench_model  # noqa: E402

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case (the best is kept)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint's UNet instead of SD1.5's")
    args = parser.parse_args()

    use_comfy()
    import torch
    import nodes

    asyncio.run(nodes.load_custom_node(str(PACK_DIR)))
    from concept_factory import model_shapes, random_concept

    pack = pack_module("nodes.comfyui.attention")
    weights = pack_module("nodes.comfyui.weights")
    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    base = bench_model(args.tiny, dtype)
    dm = base.get_model_object("diffusion_model")
    concept = random_concept(*model_shapes({f"diffusion_model.{k}": tuple(v.shape) for k, v in dm.state_dict().items()}),
                             gate=0.5)
    model = weights.add_concept(base, concept, 1.0)
    keys = sorted(k for k in concept.rra)
    lat = args.size // 8
    reference = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(1))
    context = concept.reference_context[None]

    def rra_model(cache: bool, contexts: str = "per_branch", reference_weights: str = "base"):
        settings = pack.ReferenceSettings(cache=cache, contexts=contexts, weights=reference_weights)
        return pack.ReferenceAttention(concept, keys, reference, context, settings).patch(model)

    g = torch.Generator().manual_seed(2)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.randn(1, 77, 768, generator=g), {}]]
    sampler_node = nodes.NODE_CLASS_MAPPINGS["EqDiffEquilibratedSampler"]

    def timed(fn):
        best = float("inf")
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    results = {}
    for batch in args.batches:
        latent = {"samples": torch.zeros(batch, 4, lat, lat)}
        case = {}
        with torch.inference_mode():
            plain = lambda: nodes.common_ksampler(model, 0, args.steps, args.cfg, "ddim", "ddim_uniform", pos, neg,  # noqa: E731
                                                  latent, disable_noise=False)
            plain()  # warm-up (model load, kernels)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            case["ksampler_s_per_image"] = timed(plain) / batch
            case["ksampler_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

            uncached = rra_model(cache=False)
            run = lambda m, seed: sampler_node.execute(m, pos, neg, latent, seed, args.steps, args.cfg, 0.0)  # noqa: E731
            official = run(uncached, 0).args[0]["samples"]
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            case["eqdiff_rra_s_per_image"] = timed(lambda: run(uncached, 0)) / batch
            case["eqdiff_rra_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            for contexts, reference_weights in (("shared", "base"), ("per_branch", "model"), ("shared", "model")):
                variant = rra_model(cache=False, contexts=contexts, reference_weights=reference_weights)
                latent_out = run(variant, 0).args[0]["samples"]
                name = f"rra_{contexts}_{reference_weights}"
                case[f"{name}_s_per_image"] = timed(lambda: run(variant, 0)) / batch
                case[f"{name}_over_official"] = case[f"{name}_s_per_image"] / case["eqdiff_rra_s_per_image"]
                # how far the faster option moves the result: relative L2 of the sampled latents
                case[f"{name}_relative_difference"] = float((latent_out - official).norm() / official.norm())

            cached = rra_model(cache=True)
            run(cached, 0)  # fills the cache
            seeds = iter(range(1, 1 + args.repeats))
            case["eqdiff_rra_cached_s_per_image"] = timed(lambda: run(cached, next(seeds))) / batch
        case["rra_over_ksampler"] = case["eqdiff_rra_s_per_image"] / case["ksampler_s_per_image"]
        case["cached_over_ksampler"] = case["eqdiff_rra_cached_s_per_image"] / case["ksampler_s_per_image"]
        results[f"batch_{batch}"] = case

    print(json.dumps({
        "benchmark": "sample", "size": args.size, "steps": args.steps, "cfg": args.cfg, "dtype": str(dtype),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "unet": "tiny" if args.tiny else "sd15", "rra_layers": len(keys), "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
