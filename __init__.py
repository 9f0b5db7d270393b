"""Equilibrated Diffusion (EqDiff) for ComfyUI: V3 entry point."""

from comfy_api.latest import ComfyExtension, io


class EqDiffExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .nodes import node_list

        return node_list()


async def comfy_entrypoint() -> EqDiffExtension:
    return EqDiffExtension()
