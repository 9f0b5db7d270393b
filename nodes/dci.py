"""DCI Guider ("Divide, Conquer, then Integrate", ECCV 2024) and the preview of its integration weights."""

from __future__ import annotations

from ..eqdiff_core import dci, plot
from ..eqdiff_core.rra import grid_size
from .comfyui import tokens
from .comfyui.guiders import AUX_INITS, UNCOND_MODES, DCISettings, dci_guider, last_weights
from .comfyui.node_api import check_range, io, require_choices


class EqDiffDCIGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffDCIGuider",
            display_name="DCI Guider",
            category="EqDiff",
            description="Divide, Conquer, then Integrate (Jin et al., ECCV 2024), training-free: in the first steps "
            "a second, auxiliary branch samples the prompt with the subject's words replaced by a common noun, on "
            "a latent of its own, and every cross-attention layer mixes its output into the subject's branch "
            "where the prompt's context (not the subject) dominates. Keeps the subject's identity while the "
            "scene follows the text. Any customized SD1.x MODEL (EqDiff concept, LoRA, embedding); a GUIDER for "
            "SamplerCustomAdvanced, with a sampler that evaluates once per step (ddim, euler, EqDiff Sampler).",
            inputs=[
                io.Model.Input("model", tooltip="The customized MODEL (after Apply Concept, a LoRA, the RRA Patch)."),
                io.Clip.Input("clip", tooltip="The CLIP that reads the concept token (Apply Concept's clip)."),
                io.String.Input("prompt", multiline=True, default="a photo of <concept> dog in Times Square",
                                tooltip="The prompt with the subject's words, e.g. 'a photo of <token> dog on the "
                                "moon' (one CLIP row: at most 75 tokens)."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="The negative prompt of both branches (the authors: empty)."),
                io.String.Input("concept_words", default="",
                                tooltip="The words naming the subject in the prompt (e.g. 'sks dog' for a LoRA). "
                                "Empty: found automatically, the concept token (<name> or embedding:name) and the "
                                "class word after it."),
                io.String.Input("class_word", default="",
                                tooltip="The subject's class noun (e.g. dog). Empty: the word after the concept "
                                "token is taken as the class word."),
                io.String.Input("aux_noun", default="",
                                tooltip="The auxiliary branch's noun replacing the subject's words: any common noun "
                                "that is not the class word; one with a strong prior in the scene helps. Empty: "
                                "the first of cat, dog, person, car, chair that is not a concept word."),
                io.Float.Input("dci_lambda", display_name="lambda", default=0.0, min=-2.0, max=2.0, step=0.1,
                               tooltip="How much of the auxiliary branch is injected (the authors: -2 ... 2). "
                               "Higher: better text alignment, less fidelity. 0 still injects about half in the "
                               "background; only lower values suppress it."),
                io.Float.Input("dci_fraction", default=dci.CODE_FRACTION, min=0.0, max=1.0, step=0.01,
                               tooltip="The share of the schedule (from the noisiest step) where DCI acts: the "
                               "authors' code 0.3, the paper 0.15. 0: no DCI, exactly CFG."),
                io.Float.Input("cfg", default=6.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale of both branches (the authors: 6)."),
                io.Combo.Input("uncond", options=list(UNCOND_MODES), default="shared",
                               tooltip="shared: the auxiliary branch reuses the subject branch's unconditional "
                               "prediction (the authors' default, 3 rows). separate: its own on its latent (4 rows)."),
                io.Combo.Input("aux_init", options=list(AUX_INITS), default="independent",
                               tooltip="independent: the auxiliary latent starts from noise of its own (the "
                               "authors' code). same_noise: from the same noise as the image."),
                io.Int.Input("aux_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the auxiliary noise (aux_init = independent)."),
            ],
            outputs=[
                io.Guider.Output("guider", display_name="guider", tooltip="For SamplerCustomAdvanced."),
                io.String.Output("auxiliary_prompt", display_name="auxiliary prompt",
                                 tooltip="The auxiliary branch's prompt P_a."),
            ],
        )

    @classmethod
    def validate_inputs(cls, dci_lambda, dci_fraction, cfg) -> bool | str:
        return check_range(cls, dci_lambda=dci_lambda, dci_fraction=dci_fraction, cfg=cfg)

    @classmethod
    def execute(cls, model, clip, prompt, negative, concept_words, class_word, aux_noun, dci_lambda, dci_fraction,
                cfg, uncond, aux_init, aux_seed) -> io.NodeOutput:
        require_choices(cls, uncond=uncond, aux_init=aux_init)
        phrase = dci.concept_phrase(prompt, concept_words, class_word)
        aux_noun = aux_noun.strip() or dci.default_aux_noun(phrase)
        aux_prompt = dci.auxiliary_prompt(prompt, phrase, aux_noun)
        try:
            prompt_row, aux_row = tokens.real_tokens(clip, prompt), tokens.real_tokens(clip, aux_prompt)
        except ValueError as e:
            raise ValueError(f"prompt: {e}") from e
        concept_columns, aux_columns = dci.token_columns(prompt_row, tokens.real_tokens(clip, phrase), aux_row,
                                                         tokens.real_tokens(clip, aux_noun))
        settings = DCISettings(dci_lambda, dci_fraction, cfg, tuple(concept_columns), len(prompt_row),
                               tuple(aux_columns), len(aux_row), uncond, aux_init, aux_seed)
        guider = dci_guider(model, tokens.conditioning(clip, prompt), tokens.conditioning(clip, negative),
                            tokens.conditioning(clip, aux_prompt), settings)
        return io.NodeOutput(guider, aux_prompt)


class EqDiffDCIWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffDCIWeights",
            display_name="DCI Integration Weights",
            category="EqDiff",
            description="Where the DCI Guider's last run injected the auxiliary branch (the paper's Fig. 11): per "
            "cross-attention layer, the auxiliary weight w_a over the image, averaged over the heads and the "
            "DCI window's steps (white: the auxiliary branch's output, black: the subject's).",
            inputs=[
                io.Guider.Input("guider", tooltip="The DCI Guider's output."),
                io.Latent.Input("samples", tooltip="The sampler's output, so that this node runs after sampling."),
            ],
            outputs=[io.Image.Output("weights", display_name="weights", tooltip="One map per layer, labelled.")],
        )

    @classmethod
    def execute(cls, guider, samples) -> io.NodeOutput:
        weights, (h, w), evaluations = last_weights(guider)
        grids = {key: grid_size(values.numel(), h, w) for key, values in weights.items()}
        maps = [(f"{key} {grids[key][0]}x{grids[key][1]}: mean {float(values.mean()):.2f}", values.reshape(grids[key]))
                for key, values in weights.items()]
        title = f"DCI w_a, {evaluations} window evaluations" if maps else "DCI window was empty: no weights"
        return io.NodeOutput(plot.map_grid(maps, title)[None])


NODES = [EqDiffDCIGuider, EqDiffDCIWeights]
