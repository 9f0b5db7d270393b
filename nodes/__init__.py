"""ComfyUI nodes over eqdiff_core: one module per node family; ComfyUI's internals are used only in
the ``comfyui`` sub-package."""

from __future__ import annotations


def node_list() -> list:
    from . import compare, concept, dci, frequency, grounding, metrics, prior, prompts, reference, sampler, subject, trainer
    from .comfyui import folders

    folders.register()
    return [*frequency.NODES, *concept.NODES, *reference.NODES, *sampler.NODES, *subject.NODES, *prior.NODES,
            *trainer.NODES, *metrics.NODES, *prompts.NODES, *grounding.NODES, *dci.NODES, *compare.NODES]
