"""FDTE Trainer, its options and Save Concept: learn a subject from a few photos and their masks."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import fields

import torch

from ..eqdiff_core import concept as concept_io
from ..eqdiff_core import training
from ..eqdiff_core.plot import loss_curve
from .comfyui import folders, management, weights
from .comfyui.node_api import io, require_choices
from .comfyui.training import TrainingBackend, initial_parameters, training_data
from .concept import Concept, apply_concept

TrainOptions = io.Custom("EQDIFF_TRAIN_OPTIONS")
PRESET = "preset"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_name(name: str | None) -> bool | str:
    """A concept name is a file name and part of the prompt token."""
    if name is not None and not NAME_PATTERN.match(name):
        return f"name: {name!r} must start with a letter or digit and hold only letters, digits, _ . -"
    return True

OPTION_TOOLTIPS = {
    "p_low": "Probability of the low-frequency branch (S*_LF on the photo's low band), Eq. 5.",
    "p_high": "Probability of the high-frequency branch (S*_HF on the photo's high band).",
    "p_original": "Probability of the original branch (S*_LF + S*_HF on the photo).",
    "branches_on_prior": "Draw branches for the class images too (the authors' code does).",
    "filter_shape": "Frequency filter: square box (the authors' code) or circle (the paper, Eq. 4).",
    "filter_profile": "Filter edge: ideal (hard), gaussian or butterworth.",
    "grayscale": "Split the grayscale image (the authors' code) instead of each colour channel.",
    "band_output": "magnitude |IFFT| (the authors' code) or the signed band (the paper).",
    "low_cutoff_bins": "The low band keeps frequencies below this many FFT bins on a 512 grid (authors: 50).",
    "high_cutoff_bins": "The high band drops frequencies below this many bins on a 512 grid (authors: 5).",
    "init_token": "Both embeddings start as this word's (first token's) embedding; a rare token.",
    "train_kv": "Train the cross-attention K/V of every layer (Custom Diffusion), as the authors do.",
    "train_rra": "Train the RRA layers (reference projections and H_r).",
    "detach_start_token": "The start token's cross-attention keys and values pass no gradient to the K/V "
    "deltas, as Custom Diffusion and the authors' code do.",
    "rra_layers": "Which self-attention layers get RRA (authors: middle+output).",
    "mask_noise": "MGDP noising, Eq. 6: only the subject is noised, the background stays clean.",
    "masked_loss": "MGDP loss, Eq. 7: the noise prediction counts only inside the (dilated) mask.",
    "dilate_iterations": "How often the latent-size mask is dilated with a max-pool (authors: 5).",
    "dilate_kernel": "Size of that max-pool, odd (authors: 5).",
    "reference_timestep_offset": "The reference is noised at t - offset (authors: 2; the paper: 0).",
    "reference_augment": "Scale / paste / crop the reference photo at random (the authors' augmentation).",
    "ra_loss_weight": "Weight of L_ra, Eq. 10 (authors: 0.1).",
    "ra_loss_form": "L_ra as the authors' code computes it, or the norm written in the paper.",
    "cross_attention_loss_weight": "Weight of the token's cross-attention mask loss (authors: 0.1; paper: 0).",
    "prior_loss_weight": "Weight of the prior-preservation loss on the class images.",
    "weight_decay": "AdamW weight decay (authors: 0.01).",
    "max_grad_norm": "Gradient clipping of K/V and RRA (authors: 1.0; 0 = off).",
    "resolution": "Training resolution; photos are resized to a square of this side.",
    "prompt_template": "The training prompt; {token} and {class_word} are filled in.",
    "class_prompt": "Prompt of the class images (authors: the class word alone); {class_word} is filled in.",
    "reference_prompt": "The text the photos' reference pass reads while training: the instance prompt with the "
    "placeholder at its initial embedding (the authors) or the class prompt.",
    "inference_reference_prompt": "The text the RRA Patch's reference pass reads at inference, stored in the "
    "concept; {class_word} is filled in. The authors' configs describe the reference photo.",
    "masked_loss_normalisation": "Eq. 7 divided by the mask area (the authors) or by area x channels (a "
    "per-element mean).",
    "ico_prefix_tokens": "ICO (DCI/ICO, ECCV 2024): M learnable context tokens before the concept in each photo's "
    "training prompt, one set per photo and branch, thrown away after training; they soak up what is "
    "particular to one photo (pose, light, background). 0 with ico_suffix_tokens 0 = off. The authors: 4 "
    "(ICO alone), 1 (models meant for DCI).",
    "ico_suffix_tokens": "ICO: L learnable context tokens after the class word (the authors: 2 alone, 1 for DCI).",
    "ico_lr_multiplier": "ICO: the contexts' learning rate as a multiple of learning_rate (the authors: 10).",
    "ico_prefix_init": "ICO: the prefix contexts start as the last M tokens of this text (the authors: 'a photo of "
    "a').",
    "ico_suffix_init": "ICO: the suffix contexts start as the first L tokens of this text (the authors: '.').",
    "purecc_weight": "PureCC's pure-learning loss, weight eta (0 = off; the authors: 2): the prediction for the "
    "concept prompt should equal the prediction for purecc_base_prompt plus lambda times the concept "
    "direction of a frozen Stage-1 concept (connect it to the trainer's purecc_stage1). 3 extra UNet predictions "
    "per photo row (1 with gradients when purecc_base is trained).",
    "purecc_lambda": "PureCC: lambda, the strength of the Stage-1 concept direction (the authors: 1).",
    "purecc_extractor": "PureCC: the extractor passes use the Stage-1 concept's K/V and token (concept, the paper) "
    "or only its token on the base weights (token_only, the authors' released code).",
    "purecc_base": "PureCC: eps_base from the model being trained, with gradients (trained, the paper) or from "
    "the frozen base model (frozen, the paper's supplementary variant).",
    "purecc_base_prompt": "PureCC: y_base, the prompt without the subject; {class_word} is filled in.",
    "purecc_masked": "PureCC: the term counts only inside the MGDP mask, like Eq. 7.",
}

OPTION_CHOICES = training.CHOICES


def _option_inputs() -> list:
    """One input per TrainingSettings field; its neutral value (-1, "preset", "") keeps the preset's."""
    inputs = []
    for f in fields(training.TrainingSettings):
        tip = OPTION_TOOLTIPS[f.name]
        optional = f.name in training.RELATED_METHOD_SETTINGS
        if f.type == "bool":
            inputs.append(io.Combo.Input(f.name, options=[PRESET, "on", "off"], default=PRESET, tooltip=tip,
                                         optional=optional))
        elif f.name in OPTION_CHOICES:
            inputs.append(io.Combo.Input(f.name, options=[PRESET, *OPTION_CHOICES[f.name]], default=PRESET, tooltip=tip,
                                         optional=optional))
        elif f.type == "float":
            inputs.append(io.Float.Input(f.name, default=-1.0, min=-1.0, max=1000.0, step=0.01,
                                         tooltip=tip + " -1 = the preset's value.", optional=optional))
        elif f.type == "int":
            inputs.append(io.Int.Input(f.name, default=-1, min=-1, max=4096, tooltip=tip + " -1 = the preset's value.",
                                       optional=optional))
        else:
            inputs.append(io.String.Input(f.name, default="", tooltip=tip + " Empty = the preset's value.",
                                          optional=optional))
    return inputs


def _overrides(values: dict) -> dict:
    out = {}
    for f in fields(training.TrainingSettings):
        v = values.get(f.name)
        if v is None or v == PRESET or v == "" or (f.type in ("float", "int") and v == -1):
            continue
        out[f.name] = (v == "on") if f.type == "bool" else v
    return out


class EqDiffTrainerOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffTrainerOptions",
            display_name="FDTE Trainer Options",
            category="EqDiff/training",
            description="Overrides single knobs of the FDTE Trainer's preset. Every input left at 'preset', -1 or "
            "empty keeps the preset's value.",
            inputs=_option_inputs(),
            outputs=[TrainOptions.Output("options", display_name="options", tooltip="Connect to the FDTE Trainer.")],
        )

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        require_choices(cls, **{f.name: values.get(f.name) for f in fields(training.TrainingSettings)
                                if (f.type == "bool" or f.name in OPTION_CHOICES) and values.get(f.name) is not None})
        overrides = _overrides(values)
        training.settings_for("official", **overrides)  # a bad value is refused here, naming the knob
        return io.NodeOutput(overrides)


class EqDiffFDTETrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffFDTETrainer",
            display_name="FDTE Trainer",
            category="EqDiff/training",
            description="Learns a subject from 3-6 photos and their masks (EqDiff: frequency-aware token "
            "embeddings S*_LF / S*_HF, cross-attention K/V and RRA layers, with mask-guided noising and loss). "
            "Outputs the concept and the MODEL/CLIP with it applied. Stop it at any time: the last good state "
            "is saved to models/eqdiff/<name>.autosave.safetensors and can be resumed.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x model to learn on (without a concept applied)."),
                io.Clip.Input("clip", tooltip="Its CLIP."),
                io.Vae.Input("vae", tooltip="Its VAE, to encode the photos."),
                io.Image.Input("images", tooltip="3-6 photos of the subject, as one batch."),
                io.Mask.Input("masks", tooltip="One subject mask per photo, same order (e.g. from Grounded Mask)."),
                io.String.Input("class_word", default="dog",
                                tooltip="What the subject is, e.g. dog, backpack, cat toy."),
                io.String.Input("name", default="my_concept",
                                tooltip="The concept's name; its prompt token is <name>. Letters, digits, _ . -"),
                io.Int.Input("steps", default=600, min=1, max=100000, tooltip="Training steps (the paper: 600)."),
                io.Float.Input("learning_rate", default=4e-5, min=0.0, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate (the authors' effective rate: 4e-5; the paper states 1e-5)."),
                io.Int.Input("batch_size", default=2, min=1, max=64,
                             tooltip="Photos per step (plus as many class images when given)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of every random draw; a resumed run with the same seed continues exactly."),
                io.Combo.Input("precision", options=["bf16", "fp32"], default="bf16",
                               tooltip="bf16: mixed precision (fast, on GPUs with bf16). fp32: the authors' setting."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute activations in the backward pass: much less memory, slower."),
                io.Combo.Input("preset", options=list(training.PRESETS), default="official",
                               tooltip="official: the authors' code (the paper's numbers). paper: the text as written."),
                io.Image.Input("class_images", optional=True,
                               tooltip="Images of the class (e.g. other dogs) for prior preservation."),
                TrainOptions.Input("options", optional=True, tooltip="Knob overrides from FDTE Trainer Options."),
                Concept.Input("resume_from", optional=True,
                              tooltip="Continue training this concept (e.g. an autosave); its optimiser state, "
                              "when saved, makes it continue as an uninterrupted run."),
                io.Int.Input("save_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Save to models/eqdiff/<name>.autosave.safetensors every this many steps (0 = "
                             "only when stopped or failed)."),
                Concept.Input("purecc_stage1", optional=True,
                              tooltip="PureCC's Stage-1 concept (its extractor): a concept trained before on the same "
                              "subject, e.g. a plain FDTE Trainer run. Used only when the options set "
                              "purecc_weight > 0, and needed then."),
            ],
            outputs=[
                Concept.Output("concept", display_name="concept", tooltip="The learned concept."),
                io.Model.Output("concept_model", display_name="model", tooltip="The MODEL with the concept's K/V."),
                io.Clip.Output("concept_clip", display_name="clip", tooltip="The CLIP that knows <name>."),
                io.Image.Output("loss_plot", display_name="loss plot", tooltip="The loss per step."),
                io.String.Output("concept_token", display_name="token", tooltip="The token to write in prompts."),
            ],
        )

    @classmethod
    def validate_inputs(cls, name) -> bool | str:
        return _check_name(name)

    @classmethod
    def execute(cls, model, clip, vae, images, masks, class_word, name, steps, learning_rate, batch_size, seed,
                precision, gradient_checkpointing, preset, class_images=None, options=None, resume_from=None,
                save_every=0, purecc_stage1=None) -> io.NodeOutput:
        require_choices(cls, precision=precision, preset=preset)
        ok = _check_name(name)
        if ok is not True:
            raise ValueError(ok)
        if steps < 1:
            raise ValueError(f"steps: {steps} trains nothing; give at least 1 (the paper: 600)")
        with torch.inference_mode(False):
            return cls._train(model, clip, vae, images, masks, class_word.strip(), name, steps, learning_rate,
                              batch_size, seed, precision, gradient_checkpointing, preset, class_images,
                              options or {}, resume_from, save_every or 0, purecc_stage1)

    @classmethod
    def _train(cls, model, clip, vae, images, masks, class_word, name, steps, learning_rate, batch_size, seed,
               precision, gradient_checkpointing, preset, class_images, options, resume, save_every, extractor):
        masks = masks.reshape(-1, *masks.shape[-2:])  # a single (H, W) mask is a batch of one
        _check_inputs(images, masks, class_word, learning_rate)
        settings = training.settings_for(preset, **options)
        dtype = _training_dtype(precision)
        token = f"<{name}>"
        if resume is not None:
            weights.check_concept_fits(resume, model, clip)
        if settings.purecc:
            if extractor is None:
                raise ValueError(f"purecc_stage1: the options set purecc_weight {settings.purecc_weight} but no "
                                 f"Stage-1 concept is connected; train the subject once without PureCC and connect "
                                 f"that concept here, or set purecc_weight to 0")
            weights.check_concept_fits(extractor, model, clip)
        params = initial_parameters(model, clip, settings, resume, photos=int(images.shape[0]))
        start = int(resume.metadata.get("training_step", 0)) if resume is not None and resume.training_state else 0
        history = list(resume.metadata.get("loss_history", [])) if resume is not None else []
        data = training_data(model, vae, images, masks, class_images, settings, settings.resolution)
        if settings.purecc:
            data.extractor_tokens = torch.stack([extractor.token_lf, extractor.token_hf]).to(data.latents.device)
        params.to(data.latents.device)
        optimizer = training.make_optimizer(params, learning_rate, settings)
        if resume is not None and resume.training_state:
            training.load_optimizer_state(optimizer, params, resume.training_state)
        backend = TrainingBackend(model, clip, params, settings, token=token, class_word=class_word, dtype=dtype,
                                  gradient_checkpointing=gradient_checkpointing,
                                  extractor=extractor if settings.purecc else None)
        reference_context = backend.inference_reference_context
        metadata = {"name": name, "token": token, "class_word": class_word, "preset": preset,
                    "settings": settings.to_dict(), "learning_rate": learning_rate, "batch_size": batch_size,
                    "seed": seed, "precision": precision, "steps": steps, "photos": int(images.shape[0]),
                    "class_images": 0 if class_images is None else int(class_images.shape[0]),
                    "base_model": type(model.model).__name__ + "/" + type(model.model.model_config).__name__,
                    "base_model_hash": weights.base_fingerprint(model)}
        if settings.purecc:
            metadata["purecc_stage1"] = extractor.name
        autosave = os.path.join(folders.default_path(folders.CONCEPTS), f"{name}.autosave.safetensors")
        progress = management.Progress(steps)
        progress.set(start)
        done = {"step": start}

        def snapshot(step_count: int) -> concept_io.Concept:
            concept = params.to_concept({**metadata, "training_step": step_count, "loss_history": history},
                                        reference_context)
            concept.training_state = training.optimizer_state(optimizer, params)
            return concept

        def on_step(step: int, parts: dict) -> None:
            history.append(parts["loss"])
            done["step"] = step + 1
            if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
                concept_io.save(snapshot(step + 1), autosave)
            preview = None
            if (step + 1) % 25 == 0 or step + 1 == steps:
                from PIL import Image

                plot = loss_curve(history, 384, 192)
                preview = ("PNG", Image.fromarray((plot.numpy() * 255).astype("uint8")), 384)
            if (step + 1) % 50 == 0:
                logging.info("EqDiff trainer: step %d/%d, loss %.5f", step + 1, steps, parts["loss"])
            progress.set(step + 1, preview)  # also where a cancelled prompt stops the training

        try:
            training.train(params, backend, data, settings, optimizer, steps=steps, batch_size=batch_size, seed=seed,
                           start_step=start, on_step=on_step)
        except training.NonFiniteLoss as err:
            concept_io.save(snapshot(err.step), autosave)
            raise ValueError(f"learning_rate: the loss became NaN or infinite at step {err.step + 1}; the last good "
                             f"state (step {err.step}) is saved as {os.path.basename(autosave)}. Resume from it "
                             f"(Load Concept -> resume_from) with a lower learning rate, or use precision fp32.") from None
        except management.InterruptProcessingException:
            concept_io.save(snapshot(done["step"]), autosave)
            logging.warning("EqDiff trainer stopped at step %d; saved %s", done["step"], autosave)
            raise
        finally:
            del backend
            management.free_memory()
        concept = snapshot(done["step"])
        return io.NodeOutput(concept, *apply_concept(model, clip, concept, token, 1.0), loss_curve(history)[None],
                             token)


def _check_inputs(images, masks, class_word, learning_rate) -> None:
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images: expected a batch of photos (B, H, W, C), got shape {tuple(images.shape)}")
    if masks.shape[0] != images.shape[0]:
        raise ValueError(f"masks: {masks.shape[0]} masks for {images.shape[0]} photos; give one mask per photo, in "
                         f"the same order (Grounded Mask makes them from the same batch).")
    empty = [i for i in range(masks.shape[0]) if float(masks[i].max()) <= 0.0]
    if empty:
        raise ValueError(f"masks: the mask of photo {', '.join(str(i + 1) for i in empty)} is empty; the subject must "
                         f"be marked in every photo (lower the Grounded Mask threshold or drop that photo).")
    if images.shape[0] == 1:
        logging.warning("EqDiff trainer: one photo only; it is its own RRA reference. The paper uses 3-6 photos.")
    if not class_word:
        raise ValueError("class_word: empty; say what the subject is, e.g. dog or backpack")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate: must be positive, got {learning_rate} (the authors use 4e-5)")


def _training_dtype(precision: str) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if not management.supports_bf16(management.compute_device()):
        raise ValueError("precision: this GPU has no bf16; choose fp32")
    return torch.bfloat16


class EqDiffSaveConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffSaveConcept",
            display_name="Save Concept",
            category="EqDiff",
            description="Writes the concept to models/eqdiff/<name>.safetensors (atomically), for Load Concept. "
            "Optionally also S*_ori = S*_LF + S*_HF as a textual-inversion embedding for 'embedding:<name>' in any "
            "CLIP Text Encode (the token only; the K/V and RRA need Apply Concept).",
            is_output_node=True,
            inputs=[
                Concept.Input("concept", tooltip="From the FDTE Trainer or Load Concept."),
                io.String.Input("name", default="my_concept",
                                tooltip="File name without extension. Letters, digits, _ . -"),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file; otherwise a number is appended (name_001)."),
                io.Boolean.Input("save_embedding", default=False,
                                 tooltip="Also write models/embeddings/<name>.safetensors (S*_ori)."),
                io.Boolean.Input("keep_training_state", default=False,
                                 tooltip="Keep the optimiser state (about twice the file size) so training can "
                                 "resume exactly."),
            ],
            outputs=[io.String.Output("concept_name", display_name="concept name",
                                      tooltip="The file name, as Load Concept lists it.")],
        )

    @classmethod
    def validate_inputs(cls, name) -> bool | str:
        return _check_name(name)

    @classmethod
    def execute(cls, concept, name, overwrite, save_embedding, keep_training_state) -> io.NodeOutput:
        ok = _check_name(name)
        if ok is not True:
            raise ValueError(ok)
        folder = folders.default_path(folders.CONCEPTS)
        stem = name if overwrite else _free_stem(folder, name, ".safetensors")
        concept = dataclasses.replace(concept, metadata={**concept.metadata, "name": stem})  # the input stays as it is
        concept_io.save(concept, os.path.join(folder, f"{stem}.safetensors"), keep_training_state)
        if save_embedding:
            embeddings = folders.default_path(folders.EMBEDDINGS)
            emb_stem = stem if overwrite else _free_stem(embeddings, stem, ".safetensors")
            concept_io.write_safetensors({"clip_l": concept.token_ori.float()[None]},
                                         os.path.join(embeddings, f"{emb_stem}.safetensors"))
        return io.NodeOutput(f"{stem}.safetensors")


def _free_stem(folder: str, stem: str, ext: str) -> str:
    if not os.path.exists(os.path.join(folder, stem + ext)):
        return stem
    n = 1
    while os.path.exists(os.path.join(folder, f"{stem}_{n:03d}{ext}")):
        n += 1
    return f"{stem}_{n:03d}"


NODES = [EqDiffFDTETrainer, EqDiffTrainerOptions, EqDiffSaveConcept]
