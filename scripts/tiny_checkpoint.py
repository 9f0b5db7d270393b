"""Deterministic generator of the built-in tiny checkpoint: random weights in the SD1.5 layout.

It keeps what stock ComfyUI's SD15 detection requires (model_channels 320, context_dim 768,
SD1's 12-layer CLIP-L text encoder) and cuts the UNet's depth to two levels of one res block and
one transformer each, with a TAESD autoencoder as the VAE. ``CheckpointLoaderSimple`` loads it
with no extra code. The weights are drawn from a fixed seed, so every machine makes the same file.

Usage (inside the environment that ``scripts/setup_env.sh`` builds):
    python scripts/tiny_checkpoint.py --comfy .comfy/ComfyUI --out PATH
"""

from __future__ import annotations

import argparse
import math
import os
import sys

GENERATOR_VERSION = "2"
UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int):
    """Fill every tensor: variance-preserving normal weights, zero biases, unit norm scales.

    ComfyUI's ops skip weight initialisation, so nothing may be left to the modules' defaults.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("position_ids"):
            out[name] = torch.arange(shape[-1]).expand(shape).clone()
        elif name.endswith("bias") or len(shape) == 0:
            out[name] = torch.zeros(shape)
        elif len(shape) == 1:
            out[name] = torch.ones(shape)
        else:
            fan_in = math.prod(shape[1:])
            out[name] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return out


def build_state_dict(seed: int = 0):
    import torch
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd

    model_config = comfy.supported_models.SD15(UNET_CONFIG)
    model_config.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        unet = model_config.get_model({}).diffusion_model
        clip = comfy.sd1_clip.SD1ClipModel(device="meta", dtype=torch.float32)
        taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    shapes = {"model.diffusion_model." + k: tuple(v.shape) for k, v in unet.state_dict().items()}
    shapes |= {
        "cond_stage_model." + k[len("clip_l."):]: tuple(v.shape)
        for k, v in clip.state_dict().items()
        if k.startswith("clip_l.") and not k.endswith(("logit_scale", "text_projection.weight"))
    }
    shapes |= {"first_stage_model." + k: tuple(v.shape) for k, v in taesd.state_dict().items()}
    sd = random_state_dict(shapes, seed)
    # TAESD decodes SD1 latents scaled by SD1's factor; a mid-grey output bias keeps decoded
    # images away from the clamp so that tests can see differences between them.
    sd["first_stage_model.vae_scale"] = torch.tensor(0.18215)
    sd["first_stage_model.taesd_decoder.19.bias"] = torch.full((3,), 0.5)
    # CLIP's positions are integer ids; everything else is stored in fp16 like released SD1.5 files.
    return {k: (v if k.endswith("position_ids") else v.half()).contiguous() for k, v in sd.items()}


def write_checkpoint(path: str, seed: int = 0) -> str:
    """Write the tiny checkpoint atomically; skip if an identical one (same version, seed) exists."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from eqdiff_core.files import write_atomic

    meta = {"eqdiff_tiny_version": GENERATOR_VERSION, "seed": str(seed)}
    if os.path.exists(path):
        try:
            with safe_open(path, "pt") as f:
                if f.metadata() == meta:
                    return path
        except Exception:
            pass  # unreadable or foreign file: regenerate
    state = build_state_dict(seed)
    return write_atomic(path, lambda tmp: save_file(state, tmp, metadata=meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfy", required=True, help="ComfyUI folder (for its model classes)")
    parser.add_argument("--out", required=True, help="checkpoint path to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.comfy))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # eqdiff_core
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    print(write_checkpoint(args.out, args.seed))


if __name__ == "__main__":
    main()
