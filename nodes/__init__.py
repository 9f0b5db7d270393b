"""ComfyUI adapters for eqdiff_core: one module per node family, plus the shared glue."""

from __future__ import annotations

from comfy_api.latest import io


def node_list() -> list[type[io.ComfyNode]]:
    from . import frequency

    return [*frequency.NODES]
