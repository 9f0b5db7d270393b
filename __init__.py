"""Equilibrated Diffusion (EqDiff) for ComfyUI: V3 entry point."""

from .nodes.comfyui.node_api import ComfyExtension


class EqDiffExtension(ComfyExtension):
    async def get_node_list(self) -> list:
        from .nodes import node_list

        return node_list()


async def comfy_entrypoint() -> EqDiffExtension:
    return EqDiffExtension()
