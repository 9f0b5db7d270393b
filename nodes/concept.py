"""Load Concept and Apply Concept: a learned subject on MODEL (cross-attention K/V) and CLIP (its token)."""

from __future__ import annotations

import os

from ..eqdiff_core import concept as concept_io
from .comfyui import folders, tokens, weights
from .comfyui.node_api import io

Concept = io.Custom("EQDIFF_CONCEPT")


def concept_path(name: str) -> str:
    """The full path of a concept file in the concept folders, or a ConceptError naming them."""
    path = folders.full_path(folders.CONCEPTS, name)
    if path is None:
        raise concept_io.ConceptError(f"'{name}' is not in {', '.join(folders.paths(folders.CONCEPTS))}; pick a "
                                      f"file from the list, or put the .safetensors file written by EqDiff Save "
                                      f"Concept there and refresh.")
    return path


def apply_concept(model, clip, concept: concept_io.Concept, token: str, strength: float):
    """(MODEL with the concept's K/V deltas x strength, CLIP that reads ``token`` as S*_ori)."""
    return (weights.add_concept(model, concept, strength),
            tokens.with_concept_tokens(clip, {token: concept.token_ori}))


class EqDiffLoadConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffLoadConcept",
            display_name="Load Concept",
            category="EqDiff",
            description="Loads a concept file (models/eqdiff/*.safetensors) written by EqDiff Save Concept: the "
            "subject's frequency embeddings, cross-attention K/V and RRA layers.",
            inputs=[
                io.Combo.Input("concept_name", options=folders.files(folders.CONCEPTS),
                               tooltip="A concept file in models/eqdiff/."),
            ],
            outputs=[Concept.Output("concept", display_name="concept", tooltip="The learned subject.")],
        )

    @classmethod
    def validate_inputs(cls, concept_name) -> bool | str:
        if concept_name is not None:
            try:
                concept_path(concept_name)
            except concept_io.ConceptError as err:
                return f"concept_name: {err}"
        return True

    @classmethod
    def fingerprint_inputs(cls, concept_name):
        path = folders.full_path(folders.CONCEPTS, concept_name)
        return None if path is None else (os.path.getmtime(path), os.path.getsize(path))

    @classmethod
    def execute(cls, concept_name) -> io.NodeOutput:
        concept = concept_io.load(concept_path(concept_name))
        concept.metadata.setdefault("name", os.path.splitext(os.path.basename(concept_name))[0])
        return io.NodeOutput(concept)


class EqDiffApplyConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffApplyConcept",
            display_name="Apply Concept",
            category="EqDiff",
            description="Applies a concept: its cross-attention K/V deltas to the MODEL as weight patches (they "
            "combine with LoRAs) and its token to the CLIP, where it stands for S*_LF + S*_HF. Write the token in "
            "a prompt, e.g. 'a photo of <token> dog on the beach'; (<token>:1.2) weights it.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x model (the one the concept was trained on)."),
                io.Clip.Input("clip", tooltip="The CLIP of that checkpoint."),
                Concept.Input("concept", tooltip="From Load Concept or the FDTE Trainer."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Scale of the concept's K/V deltas on the MODEL (1 = as trained)."),
                io.String.Input("token", default="",
                                tooltip="The word that stands for the subject in prompts. Empty: the concept's "
                                "own token, or <concept name> if it has none."),
            ],
            outputs=[
                io.Model.Output("concept_model", display_name="model", tooltip="The MODEL with the concept's K/V."),
                io.Clip.Output("concept_clip", display_name="clip", tooltip="The CLIP that understands the token."),
                io.String.Output("concept_token", display_name="token", tooltip="The token to write in prompts."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, concept, strength, token) -> io.NodeOutput:
        weights.check_concept_fits(concept, model, clip)
        token = token.strip() or concept.metadata.get("token") or f"<{concept.name}>"
        if any(ch.isspace() for ch in token) or any(ch in token for ch in "(),:"):
            raise ValueError(f"token: {token!r} must be one word without spaces, brackets, commas or colons, "
                             f"e.g. <{concept.name}>")
        return io.NodeOutput(*apply_concept(model, clip, concept, token, strength), token)


NODES = [EqDiffLoadConcept, EqDiffApplyConcept]
