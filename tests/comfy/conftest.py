import asyncio

import pytest

from comfy_env import PACK_DIR, use_comfy

use_comfy()


@pytest.fixture(scope="session")
def registered_nodes():
    """Loads this pack through ComfyUI's own custom-node loader; returns ComfyUI's node mapping."""
    import nodes

    assert asyncio.run(nodes.load_custom_node(str(PACK_DIR))), "ComfyUI failed to import the pack"
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="session")
def tiny(registered_nodes):
    """The built-in tiny checkpoint through the stock CheckpointLoaderSimple: (MODEL, CLIP, VAE)."""
    import nodes

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("eqdiff_tiny_sd15.safetensors")[:3]
    return model, clip, vae


@pytest.fixture(scope="session")
def tiny_shapes(tiny):
    from concept_factory import model_shapes

    dm = tiny[0].get_model_object("diffusion_model")
    return model_shapes({f"diffusion_model.{k}": tuple(v.shape) for k, v in dm.state_dict().items()})


@pytest.fixture
def training_calls(monkeypatch, registered_nodes):
    """What the FDTE Trainer node hands the training loop, one dict per call (the loop then runs as always):
    train's keyword arguments, and its backend, data and settings."""
    from comfy_env import pack_module

    training = pack_module("nodes.trainer").training
    calls, train = [], training.train

    def recorded(params, backend, data, settings, optimizer, **kwargs):
        calls.append(dict(kwargs, backend=backend, data=data, settings=settings))
        return train(params, backend, data, settings, optimizer, **kwargs)

    monkeypatch.setattr(training, "train", recorded)
    return calls
