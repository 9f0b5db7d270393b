"""Running the pack's nodes in-process on the tiny checkpoint: the helpers the comfy tests share."""

from __future__ import annotations

import contextlib

import torch

from comfy_env import use_comfy

use_comfy()

import nodes  # noqa: E402  (ComfyUI's nodes module, importable once use_comfy has run)

SIZE = 64  # the photos' size and the trainer's resolution in these tests


def node(name: str):
    return nodes.NODE_CLASS_MAPPINGS[name]


def run(name: str, **inputs):
    """A node's result as the server computes it (under inference mode)."""
    with torch.inference_mode():
        return node(name).execute(**inputs).result


def encode(clip, text: str):
    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, text)[0]


@contextlib.contextmanager
def progress_reports(on_report=None):
    """The (value, total) of every progress update the nodes send while in the block, as the server's
    hook receives them, unthrottled (ComfyUI 0.9.2 on sends at most one update per 0.1 s, which would make
    what a test sees depend on the machine's speed). ``on_report(value, total)`` runs on each."""
    import comfy.utils

    reports = []

    def hook(value, total, preview, node_id=None):
        reports.append((value, total))
        if on_report is not None:
            on_report(value, total)

    throttle = getattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", None)
    if throttle is not None:
        comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL = 0.0
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield reports
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        if throttle is not None:
            comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL = throttle


@contextlib.contextmanager
def attention_calls(model, precision=torch.float32):
    """A clone of MODEL whose attention calls another pack's attention override records (ComfyUI's
    optimized_attention hands every call with transformer_options['optimized_attention_override'] to it),
    with the UNet's layers set to ``precision`` (attn_precision) while in the block. Yields the clone and
    the list of the attn_precision each call got."""
    calls = []

    def override(func, *args, **kwargs):
        calls.append(kwargs.get("attn_precision"))
        return func(*args, **kwargs)

    observed = model.clone()
    observed.model_options["transformer_options"]["optimized_attention_override"] = override
    layers = [m for m in model.get_model_object("diffusion_model").modules() if hasattr(m, "attn_precision")]
    saved = [m.attn_precision for m in layers]
    for m in layers:
        m.attn_precision = precision
    try:
        yield observed, calls
    finally:
        for m, p in zip(layers, saved):
            m.attn_precision = p


def pass_through_wrappers(model):
    """Two APPLY_MODEL wrappers of another pack around the code under test: the outer one puts markers in
    c_concat, control and a keyword argument, the inner one records per UNet call (rows, c_concat marker
    arrived, control marker arrived, keyword marker) and takes them out again. Returns a clone of MODEL with
    the outer wrapper, a function that adds the inner one to a MODEL, and the list it records to."""
    import comfy.patcher_extension

    c_concat, control = torch.zeros(1), {"input": [], "middle": [], "output": []}
    seen = []

    def outer(executor, x, t, c_concat_=None, c_crossattn=None, control_=None, transformer_options={}, **kwargs):
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, marker="outer", **kwargs)

    def inner(executor, x, t, c_concat_=None, c_crossattn=None, control_=None, transformer_options={}, **kwargs):
        seen.append((x.shape[0], c_concat_ is c_concat, control_ is control, kwargs.pop("marker", None)))
        return executor(x, t, None, c_crossattn, None, transformer_options, **kwargs)

    wrapped = model.clone()
    wrapped.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_outer", outer)

    def add_inner(patched):
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_inner", inner)

    return wrapped, add_inner, seen


def photos(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random (SIZE, SIZE) photos and masks holding the same box."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, SIZE, SIZE, 3, generator=g)
    masks = torch.zeros(n, SIZE, SIZE)
    masks[:, 16:48, 20:44] = 1.0
    return images, masks


def run_trainer(registered, tiny, steps: int = 2, **kw):
    """The FDTE Trainer node's outputs for ``photos()`` (or ``photos=``) with fast settings; ``kw`` overrides."""
    model, clip, vae = tiny
    images, masks = kw.pop("photos", photos())
    args = dict(model=model, clip=clip, vae=vae, images=images, masks=masks, class_word="dog", name="unit",
                steps=steps, learning_rate=1e-3, batch_size=1, seed=0, precision="fp32",
                gradient_checkpointing=False, preset="official", options={"resolution": SIZE})
    args.update(kw)
    return registered["EqDiffFDTETrainer"].execute(**args).args
