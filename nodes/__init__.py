"""ComfyUI adapters for eqdiff_core: one module per node family, plus the shared glue."""

from __future__ import annotations

from comfy_api.latest import io


def node_list() -> list[type[io.ComfyNode]]:
    from . import concept, frequency, grounding, metrics, prompts, reference, sampler, subject, trainer
    from .glue import register_model_folders

    register_model_folders()
    return [*frequency.NODES, *concept.NODES, *reference.NODES, *sampler.NODES, *subject.NODES, *trainer.NODES, *metrics.NODES,
            *prompts.NODES, *grounding.NODES]
