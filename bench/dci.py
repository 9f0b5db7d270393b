"""Benchmark of the DCI Guider: seconds per image against the plain path (CFGGuider with the same DDIM
sampler and schedule), with the shared unconditional (3 rows in the window) and a separate one (4 rows),
at the code's window (0.3) and the paper's (0.15), and the UNet rows each run evaluates (counted by an
APPLY_MODEL wrapper). SD1.5-architecture UNet with random weights built through ComfyUI's classes, or
the tiny checkpoint's (--tiny); random text contexts, DBIM on fixed token columns.

    .comfy/venv/bin/python bench/dci.py [--size 512] [--steps 50] [--repeats 2] [--tiny]

Prints one JSON object. On a CPU use e.g. --tiny --size 64 --steps 10 (the ratios then show the
mechanism's overhead on a tiny UNet, not SD1.5's).
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
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case (the best is kept)")
    parser.add_argument("--cfg", type=float, default=6.0)
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint's UNet instead of SD1.5's")
    args = parser.parse_args()

    use_comfy()
    import torch

    import comfy.patcher_extension
    import comfy.samplers
    import nodes

    asyncio.run(nodes.load_custom_node(str(PACK_DIR)))
    guiders = pack_module("nodes.comfyui.guiders")
    sampling = pack_module("nodes.comfyui.sampling")
    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    model = bench_model(args.tiny, dtype)
    rows: list[int] = []

    def count_rows(executor, x, *a, **kw):
        rows.append(x.shape[0])
        return executor(x, *a, **kw)

    model = model.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "bench_rows", count_rows)

    g = torch.Generator().manual_seed(2)
    positive, negative, auxiliary = ([[torch.randn(1, 77, 768, generator=g), {}]] for _ in range(3))
    lat = args.size // 8
    noise = torch.randn(1, 4, lat, lat, generator=g)
    sampler, sigmas = sampling.ddim_sampler(0.0), sampling.ddim_schedule(model, args.steps)

    def timed(guider):
        best = float("inf")
        for _ in range(args.repeats):
            rows.clear()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                guider.sample(noise, torch.zeros_like(noise), sampler, sigmas, disable_pbar=True, seed=0)
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best, sum(rows)

    plain = comfy.samplers.CFGGuider(model)
    plain.set_conds(positive, negative)
    plain.set_cfg(args.cfg)
    timed(plain)  # warm-up (model load, kernels)
    plain_s, plain_rows = timed(plain)
    results = {"plain": {"s_per_image": plain_s, "unet_rows": plain_rows}}
    for fraction in (0.3, 0.15):
        for uncond in ("shared", "separate"):
            settings = guiders.DCISettings(0.0, fraction, args.cfg, (3, 4), 8, (3,), 7, uncond)
            guider = guiders.dci_guider(model, positive, negative, auxiliary, settings)
            seconds, unet_rows = timed(guider)
            results[f"dci_{fraction}_{uncond}"] = {
                "s_per_image": seconds, "unet_rows": unet_rows, "window_steps": guider.log.last.window_evaluations,
                "time_over_plain": seconds / plain_s, "rows_over_plain": unet_rows / plain_rows}

    print(json.dumps({
        "benchmark": "dci", "size": args.size, "steps": args.steps, "cfg": args.cfg, "dtype": str(dtype),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "unet": "tiny" if args.tiny else "sd15", "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
