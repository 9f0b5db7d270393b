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
