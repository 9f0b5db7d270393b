"""An SD1.5-architecture UNet with random weights as a ComfyUI MODEL, for the benchmarks (no weights needed).
Import after ``comfy_env.use_comfy()``."""

from __future__ import annotations

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def build_model(dtype):
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    from tiny_checkpoint import random_state_dict

    config = comfy.supported_models.SD15(SD15_UNET)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=mm.get_torch_device())
    shapes = {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}
    model.diffusion_model.load_state_dict(random_state_dict(shapes, seed=0))
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def bench_model(tiny: bool, dtype):
    """The MODEL a sampling benchmark measures: the tiny checkpoint's UNet (``--tiny``, as stored) or a random
    SD1.5 UNet in ``dtype``."""
    if tiny:
        import nodes

        return nodes.CheckpointLoaderSimple().load_checkpoint("eqdiff_tiny_sd15.safetensors")[0]
    return build_model(dtype)
