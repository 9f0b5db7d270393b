"""Class Images: the images of the subject's class that prior preservation trains on, made once with the
connected model and kept on disk for every later training of the same class."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from ..eqdiff_core.files import write_atomic
from .comfyui import folders, management, sampling, tokens, weights
from .comfyui.node_api import io

CACHE_VERSION = 1


def cache_folder(model, prompt: str, size: int, seed: int, steps: int, cfg: float) -> str:
    """``models/eqdiff_class_images/<class>-<digest>``: one folder per model (the weights it computes
    with), prompt, size, seed and sampler settings. Image i depends only on these and i, so a later
    run asking for more images keeps the first ones."""
    key = {"version": CACHE_VERSION, "model": weights.fingerprint(model), "prompt": prompt, "size": size, "seed": seed,
           "steps": steps, "cfg": cfg, "sampler": "ddim"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    readable = "".join(ch if ch.isalnum() else "_" for ch in prompt)[:40] or "class"
    return os.path.join(folders.default_path(folders.CLASS_IMAGES), f"{readable}-{digest}")


def _png(image: torch.Tensor, path: str) -> None:
    """IMAGE row (H, W, 3) in [0, 1] -> an 8-bit PNG, written atomically."""
    import io as bytes_io

    from PIL import Image

    buffer = bytes_io.BytesIO()
    Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def _load(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)


class EqDiffClassImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffClassImages",
            display_name="Class Images",
            category="EqDiff/training",
            description="Images of the subject's class (other dogs, other backpacks) for the FDTE Trainer's prior "
            "preservation, sampled with the connected base model from the class prompt, as the authors do (200 "
            "images of the class word alone). They are kept in models/eqdiff_class_images/ per model, prompt, "
            "size, seed and sampler settings: the next training of the same class reuses them, and a stopped run "
            "keeps what it made.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (the one the subject is trained on, no concept)."),
                io.Clip.Input("clip", tooltip="Its CLIP."),
                io.Vae.Input("vae", tooltip="Its VAE."),
                io.String.Input("class_prompt", default="dog",
                                tooltip="What the images show. The authors use the class word alone (train.sh's "
                                "INIT_TOKEN, e.g. 'dog', 'cat_toy')."),
                io.Int.Input("count", default=200, min=1, max=10000, tooltip="How many images (the authors: 200)."),
                io.Int.Input("size", default=512, min=64, max=2048, step=64, tooltip="Their side in pixels."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Image i starts from the noise of seed + i."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="DDIM steps (the authors' pipeline: 50)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale (the authors' pipeline: 7.5)."),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Images sampled at once; more is faster where memory allows."),
            ],
            outputs=[io.Image.Output("images", display_name="images",
                                     tooltip="The class images, one batch, for the trainer's class_images.")],
        )

    @classmethod
    def validate_inputs(cls, class_prompt) -> bool | str:
        if class_prompt is not None and not class_prompt.strip():
            return "class_prompt: empty; write the subject's class, e.g. dog or backpack"
        return True

    @classmethod
    def execute(cls, model, clip, vae, class_prompt, count, size, seed, steps, cfg, batch_size) -> io.NodeOutput:
        prompt = class_prompt.strip()
        if not prompt:
            raise ValueError("class_prompt: empty; write the subject's class, e.g. dog or backpack")
        folder = cache_folder(model, prompt, size, seed, steps, cfg)
        paths = [os.path.join(folder, f"{i:05d}.png") for i in range(count)]
        missing = [i for i, path in enumerate(paths) if not os.path.isfile(path)]
        if missing:
            cls._sample(model, clip, vae, prompt, size, seed, steps, cfg, batch_size, missing, paths)
        return io.NodeOutput(torch.stack([_load(path) for path in paths]))

    @staticmethod
    def _sample(model, clip, vae, prompt, size, seed, steps, cfg, batch_size, missing, paths) -> None:
        """Samples the missing images batch by batch, each written as soon as it is decoded."""
        positive, negative = tokens.conditioning(clip, prompt), tokens.conditioning(clip, "")
        progress = management.Progress(len(missing) * steps)  # image-steps
        lat = size // 8
        for start in range(0, len(missing), batch_size):
            indices = missing[start:start + batch_size]
            noise = torch.cat([sampling.seeded_noise((1, 4, lat, lat), seed + i) for i in indices])
            latent = sampling.ddim_from_noise(model, positive, negative, noise, steps, cfg,
                                              lambda: progress.update(len(indices)))
            images = vae.decode(latent)
            for i, image in zip(indices, images.reshape(-1, *images.shape[-3:])):
                _png(image, paths[i])


NODES = [EqDiffClassImages]
