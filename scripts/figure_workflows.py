"""Writes the figure workflows of the paper (API format, workflows/api/) and, with --ui, their UI form
(workflows/) through the real frontend, with seeds fixed. The graphs are made here so that the six workflows share one
definition of "train a variant" and "generate with a concept".

    .comfy/venv/bin/python scripts/figure_workflows.py [--ui]

Nodes titled ``param:NAME`` are the parameters scripts/run_figure.py fills (checkpoint, subject,
class_word, name, train_steps, concept, token, reference, seed, steps, size, output).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUBJECT, CLASS_WORD, NAME = "backpack_dog", "backpack", "backpack_dog"
TOKEN = f"<{NAME}>"

# The ablation of the paper's Fig. 8 / Table 2 as trainer options. A: Custom Diffusion (K/V and the
# token, plain loss); B: + RRA; C: + L_ra; D: + FDTE; E: + masked loss only (Avrahami et al.);
# F: + MGDP = EqDiff (the official preset). The authors' cross-attention mask loss is part of F only.
ABLATION = {
    "A_custom_diffusion": dict(p_low=0.0, p_high=0.0, p_original=1.0, train_rra="off", ra_loss_weight=0.0,
                               cross_attention_loss_weight=0.0, mask_noise="off", masked_loss="off"),
    "B_rra": dict(p_low=0.0, p_high=0.0, p_original=1.0, ra_loss_weight=0.0, cross_attention_loss_weight=0.0,
                  mask_noise="off", masked_loss="off"),
    "C_rra_lra": dict(p_low=0.0, p_high=0.0, p_original=1.0, cross_attention_loss_weight=0.0, mask_noise="off",
                      masked_loss="off"),
    "D_fdte": dict(cross_attention_loss_weight=0.0, mask_noise="off", masked_loss="off"),
    "E_masked_loss": dict(cross_attention_loss_weight=0.0, mask_noise="off"),
    "F_mgdp_eqdiff": dict(),
}
# Fig. 9: the branch probabilities (p_l, p_h, p_o); the paper finds (0.1, 0.1, 0.8) best.
FDTE_SWEEP = [(0.0, 0.0, 1.0), (0.1, 0.1, 0.8), (0.2, 0.2, 0.6), (0.3, 0.3, 0.4)]
UNSTYLIZED = "a {} on the beach\na {} in the jungle\na {} on top of a wooden floor"
STYLIZED = "watercolor painting of a {}\n{} oil painting ghibli inspired\na {} in the style of Van Gogh"


class Graph:
    """An API-format prompt under construction."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, title: str | None = None, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        if title:
            self.nodes[node_id]["_meta"] = {"title": title}
        return node_id


def out(node_id: str, index: int = 0) -> list:
    return [node_id, index]


def options_inputs(**overrides) -> dict:
    """FDTE Trainer Options with every knob at its preset value except ``overrides``; the optional knobs of
    ICO and PureCC appear only when overridden."""
    from eqdiff_core.training import CHOICES, RELATED_METHOD_SETTINGS, TrainingSettings

    values = {}
    for f in fields(TrainingSettings):
        if f.name in RELATED_METHOD_SETTINGS:
            continue
        if f.type == "bool" or f.name in CHOICES:
            values[f.name] = "preset"
        elif f.type in ("float", "int"):
            values[f.name] = -1.0 if f.type == "float" else -1
        else:
            values[f.name] = ""
    unknown = set(overrides) - set(values) - RELATED_METHOD_SETTINGS
    if unknown:
        raise KeyError(f"unknown trainer options {unknown}")
    return {**values, **overrides}


def checkpoint(g: Graph) -> str:
    return g.add("CheckpointLoaderSimple", "param:checkpoint Load Checkpoint (SD1.x)",
                 ckpt_name="eqdiff_tiny_sd15.safetensors")


def subject(g: Graph) -> str:
    return g.add("EqDiffLoadSubject", "param:subject Subject photos", folder=SUBJECT, size=512)


def class_images(g: Graph, ckpt: str) -> list:
    """Prior preservation as the authors train: 200 images of the class word, made once and kept."""
    return out(g.add("EqDiffClassImages", "param:class_word,train_size,class_images,steps Class Images (prior "
                     "preservation)", model=out(ckpt, 0),
                     clip=out(ckpt, 1), vae=out(ckpt, 2), class_prompt=CLASS_WORD, count=200, size=512, seed=0,
                     steps=50, cfg=7.5, batch_size=4))


def train(g: Graph, ckpt: str, photos: str, masks: list, name: str, options: dict, title: str, priors: list) -> str:
    opts = g.add("EqDiffTrainerOptions", f"Options {title}", **options_inputs(**options))
    return g.add("EqDiffFDTETrainer", f"param:class_word,train_steps Trainer {title}",
                 model=out(ckpt, 0), clip=out(ckpt, 1), vae=out(ckpt, 2), images=out(photos, 0), masks=masks,
                 class_word=CLASS_WORD, name=name, steps=600, learning_rate=4e-5, batch_size=2, seed=0,
                 precision="bf16", gradient_checkpointing=False, preset="official", class_images=priors,
                 options=out(opts), save_every=0)


def rra_inputs() -> dict:
    """The RRA Patch's settings as the authors sample."""
    return dict(strength=1.0, start_percent=0.0, end_percent=1.0, reference_noise="clean", noise_seed=0,
                rows="cond_uncond", layers="middle+output", cache=True, reference_contexts="per_branch",
                reference_weights="base")


def prompts(g: Graph, text: str, title: str) -> str:
    return g.add("EqDiffPromptList", title, list="custom", subject=f"{TOKEN} {CLASS_WORD}", custom_prompts=text,
                 first_index=0, count=0, images_per_prompt=1)


def generate(g: Graph, ckpt: str, concept, reference, prompt_list: str, prefix: str, rra: bool = True,
             seed_title: str = "param:seed,steps Equilibrated Sampler", size_node: str | None = None,
             save: bool = True):
    """Apply Concept -> (RRA Patch) -> CLIP Text Encode per prompt -> Equilibrated Sampler -> VAE Decode (-> Save);
    returns the nodes Apply Concept, the prompt's encoding, the sampler and VAE Decode."""
    applied = g.add("EqDiffApplyConcept", "param:token Apply Concept", model=out(ckpt, 0), clip=out(ckpt, 1),
                    concept=concept, strength=1.0, token=TOKEN)
    model = out(applied, 0)
    if rra:
        model = out(g.add("EqDiffRRAPatch", "RRA Patch", model=model, concept=concept, reference=reference,
                          vae=out(ckpt, 2), **rra_inputs()))
    positive = g.add("CLIPTextEncode", "Prompt", clip=out(applied, 1), text=out(prompt_list, 0))
    negative = g.add("CLIPTextEncode", "Negative prompt", clip=out(applied, 1), text="")
    latent = size_node or g.add("EmptyLatentImage", "param:size Empty Latent Image", width=512, height=512, batch_size=1)
    sampled = g.add("EqDiffEquilibratedSampler", seed_title, model=model, positive=out(positive), negative=out(negative),
                    latent_image=out(latent), seed=0, steps=50, cfg=7.5, eta=0.0)
    decoded = g.add("VAEDecode", "VAE Decode", samples=out(sampled), vae=out(ckpt, 2))
    if save:
        g.add("SaveImage", f"param:output Save {prefix}", images=out(decoded), filename_prefix=f"eqdiff/{prefix}")
    return applied, positive, sampled, decoded


def reference_photo(g: Graph, photos: str) -> list:
    return out(g.add("ImageFromBatch", "Reference photo", image=out(photos, 0), batch_index=0, length=1))


def quickstart() -> dict:
    """Fig. 2: photos -> Grounded Mask -> FDTE Trainer -> Apply Concept -> RRA Patch -> Equilibrated Sampler."""
    g = Graph()
    ckpt, photos = checkpoint(g), subject(g)
    models = g.add("EqDiffGroundingLoader", "Grounding Models Loader", grounding_dino="groundingdino_swint_ogc.pth",
                   sam="sam_vit_h_4b8939.pth", device="auto", precision="auto")
    mask = g.add("EqDiffGroundedMask", "Grounded Mask", grounding=out(models), image=out(photos, 0), prompt=CLASS_WORD,
                 box_threshold=0.3, text_threshold=0.25, boxes="best", dilate=0, feather=0.0, detect_size=800)
    g.add("PreviewImage", "Masks", images=out(mask, 1))
    trainer = train(g, ckpt, photos, out(mask, 0), NAME, {}, "(EqDiff)", class_images(g, ckpt))
    g.nodes[trainer]["_meta"]["title"] = "param:class_word,name,train_steps FDTE Trainer"
    g.add("EqDiffSaveConcept", "param:name Save Concept", concept=out(trainer), name=NAME, overwrite=False,
          save_embedding=False, keep_training_state=False)
    g.add("PreviewImage", "Loss", images=out(trainer, 3))
    generate(g, ckpt, out(trainer), reference_photo(g, photos), prompts(g, UNSTYLIZED, "param:prompt Prompts"),
             "quickstart")
    return g.nodes


def saved_concept(g: Graph) -> tuple[str, str, str]:
    """Checkpoint, a saved concept and its reference photo: the start of the figures that only sample."""
    ckpt = checkpoint(g)
    concept = g.add("EqDiffLoadConcept", "param:concept Load Concept", concept_name=f"{NAME}.safetensors")
    reference = g.add("LoadImage", "param:reference Reference photo", image=f"{SUBJECT}_00.jpg")
    return ckpt, concept, reference


def fig1_customization() -> dict:
    """Fig. 1: one concept under unstylized and stylized prompts."""
    g = Graph()
    ckpt, concept, reference = saved_concept(g)
    text = UNSTYLIZED + "\n" + STYLIZED
    generate(g, ckpt, out(concept), out(reference), prompts(g, text, "param:prompt Unstylized and stylized prompts"),
             "fig1")
    return g.nodes


def fig5_reference_attention() -> dict:
    """Fig. 5: the aggregated reference attention and the learned reference mask M^f of a generated image."""
    g = Graph()
    ckpt, concept, reference = saved_concept(g)
    ref_mask = g.add("LoadImageMask", "Reference subject mask", image=f"{SUBJECT}_00_mask.png", channel="red")
    applied, positive, sampled, _ = generate(g, ckpt, out(concept), out(reference),
                                          prompts(g, "a {} on the beach", "param:prompt Prompt"), "fig5")
    maps = g.add("EqDiffReferenceMaps", "Reference Attention Maps", model=out(applied, 0), concept=out(concept),
                 reference=out(reference), vae=out(ckpt, 2), positive=out(positive), latent=out(sampled),
                 percent=0.5, seed=0, reference_mask=out(ref_mask))
    for index, label in enumerate(["reference_mask_Mf", "aggregated_attention", "attention_on_reference"]):
        g.add("SaveImage", f"Save {label}", images=out(maps, index), filename_prefix=f"eqdiff/fig5_{label}")
    return g.nodes


def _variants(title: str, variants: dict[str, dict], prompt_text: str, prefix: str) -> dict:
    """One trainer per variant on the same photos, each generating the same prompts with the same seed."""
    g = Graph()
    ckpt, photos = checkpoint(g), subject(g)
    reference = reference_photo(g, photos)
    latent = g.add("EmptyLatentImage", "param:size Empty Latent Image", width=512, height=512, batch_size=1)
    prompt_list = prompts(g, prompt_text, f"param:prompt {title} prompts")
    priors = class_images(g, ckpt)
    for label, overrides in variants.items():
        trainer = train(g, ckpt, photos, out(photos, 1), f"{NAME}_{label}", overrides, label, priors)
        generate(g, ckpt, out(trainer), reference, prompt_list, f"{prefix}_{label}",
                 rra=overrides.get("train_rra") != "off", size_node=latent)
    return g.nodes


ICO = dict(ico_prefix_tokens=4, ico_suffix_tokens=2)  # the authors' M and L for ICO alone
PURECC = dict(purecc_weight=2.0)  # eta as the authors' code; lambda 1 and the rest at their defaults



def scored_column(g: Graph, applied: str, images: list, prompt_list: str, photos: str, label: str) -> list:
    """The column's images as one batch, saved and scored with CLIP-T, CLIP-I and DINO-I against the photos."""
    batch = out(g.add("RebatchImages", f"Rebatch {label}", images=images, batch_size=4096))
    g.add("SaveImage", f"param:output Save {label}", images=batch, filename_prefix=f"eqdiff/fig6_{label}")
    metrics = g.add("EqDiffMetrics", f"Metrics {label}", generated=batch, references=out(photos, 0),
                    prompts=out(prompt_list, 1), concept_tokens=out(applied, 2), clip_model="clip-vit-base-patch32",
                    dino_model="dino-vits16", preprocessing="custom_diffusion", clip_t_weight=2.5, device="auto",
                    filename_prefix=f"eqdiff/fig6/{label}")
    g.add("SaveImage", f"Save metrics {label}", images=out(metrics, 5), filename_prefix=f"eqdiff/fig6_metrics_{label}")
    return batch


def dci_generate(g: Graph, ckpt: str, concept, reference, prompt_list: str, latent: str) -> tuple[str, list]:
    """Apply Concept -> RRA Patch -> DCI Guider per prompt -> SamplerCustomAdvanced (DDIM) -> VAE Decode."""
    applied = g.add("EqDiffApplyConcept", "param:token Apply Concept (DCI)", model=out(ckpt, 0), clip=out(ckpt, 1),
                    concept=concept, strength=1.0, token=TOKEN)
    model = g.add("EqDiffRRAPatch", "RRA Patch (DCI)", model=out(applied, 0), concept=concept, reference=reference,
                  vae=out(ckpt, 2), **rra_inputs())
    guider = g.add("EqDiffDCIGuider", "DCI Guider", model=out(model), clip=out(applied, 1), prompt=out(prompt_list, 0),
                   negative="", concept_words="", class_word=CLASS_WORD, aux_noun="", dci_lambda=0.0,
                   dci_fraction=0.3, cfg=7.5, uncond="shared", aux_init="independent", aux_seed=0)
    noise = g.add("RandomNoise", "param:seed Noise", noise_seed=0)
    sampler = g.add("KSamplerSelect", "DDIM", sampler_name="ddim")
    sigmas = g.add("BasicScheduler", "param:steps Schedule", model=out(model), scheduler="ddim_uniform", steps=50,
                   denoise=1.0)
    sampled = g.add("SamplerCustomAdvanced", "Sampler (DCI)", noise=out(noise), guider=out(guider),
                    sampler=out(sampler), sigmas=out(sigmas), latent_image=out(latent))
    g.add("SaveImage", "Save DCI weights", filename_prefix="eqdiff/fig6_dci_weights",
          images=out(g.add("EqDiffDCIWeights", "DCI Integration Weights", guider=out(guider), samples=out(sampled))))
    return applied, out(g.add("VAEDecode", "VAE Decode (DCI)", samples=out(sampled), vae=out(ckpt, 2)))


def fig6_comparison() -> dict:
    """Fig. 6: the same subject, prompts and seed with Custom Diffusion, EqDiff, EqDiff + DCI, EqDiff trained
    with ICO and PureCC (Custom Diffusion's setting with the pure-learning loss, its Stage 1 the Custom
    Diffusion concept), side by side in a labelled grid, each column scored by the metrics node."""
    g = Graph()
    ckpt, photos = checkpoint(g), subject(g)
    reference = reference_photo(g, photos)
    latent = g.add("EmptyLatentImage", "param:size Empty Latent Image", width=512, height=512, batch_size=1)
    prompt_list = prompts(g, UNSTYLIZED + "\n" + STYLIZED, "param:prompt Comparison prompts")
    priors = class_images(g, ckpt)
    cd_options = ABLATION["A_custom_diffusion"]
    trained = {label: train(g, ckpt, photos, out(photos, 1), f"{NAME}_{label}", options, label, priors)
               for label, options in (("custom_diffusion", cd_options), ("eqdiff", {}), ("eqdiff_ico", ICO))}
    trained["purecc"] = train(g, ckpt, photos, out(photos, 1), f"{NAME}_purecc", {**cd_options, **PURECC}, "purecc",
                              priors)
    g.nodes[trained["purecc"]]["inputs"]["purecc_stage1"] = out(trained["custom_diffusion"])
    columns = {}
    for label in ("custom_diffusion", "eqdiff"):
        applied, _, _, decoded = generate(g, ckpt, out(trained[label]), reference, prompt_list, label,
                                          rra=label != "custom_diffusion", size_node=latent, save=False)
        columns[label] = (applied, out(decoded))
    columns["eqdiff_dci"] = dci_generate(g, ckpt, out(trained["eqdiff"]), reference, prompt_list, latent)
    for label in ("eqdiff_ico", "purecc"):
        applied, _, _, decoded = generate(g, ckpt, out(trained[label]), reference, prompt_list, label,
                                          rra=label != "purecc", size_node=latent, save=False)
        columns[label] = (applied, out(decoded))
    batches = {label: scored_column(g, applied, images, prompt_list, photos, label)
               for label, (applied, images) in columns.items()}
    labels = {"custom_diffusion": "Custom Diffusion", "eqdiff": "EqDiff", "eqdiff_dci": "EqDiff + DCI",
              "eqdiff_ico": "EqDiff + ICO", "purecc": "PureCC"}
    grid = g.add("EqDiffComparisonGrid", "Comparison Grid", labels="\n".join(labels[k] for k in batches),
                 row_labels=out(prompt_list, 1),
                 **{f"column_{i}": batch for i, batch in enumerate(batches.values(), 1)})
    g.add("SaveImage", "param:output Save comparison", images=out(grid), filename_prefix="eqdiff/fig6_comparison")
    return g.nodes


def fig8_ablation() -> dict:
    return _variants("Ablation", ABLATION, UNSTYLIZED + "\n" + STYLIZED, "fig8")


def fig9_fdte_probabilities() -> dict:
    sweep = {f"pl{pl}_ph{ph}_po{po}": dict(p_low=pl, p_high=ph, p_original=po) for pl, ph, po in FDTE_SWEEP}
    return _variants("FDTE sweep", sweep, STYLIZED, "fig9")


WORKFLOWS = {
    "eqdiff_quickstart": quickstart,
    "fig1_customization": fig1_customization,
    "fig5_reference_attention": fig5_reference_attention,
    "fig6_comparison": fig6_comparison,
    "fig8_ablation": fig8_ablation,
    "fig9_fdte_probabilities": fig9_fdte_probabilities,
}


def write_api(name: str, nodes: dict) -> Path:
    path = REPO / "workflows" / "api" / f"{name}.json"
    lines = [f'  "{k}": {json.dumps(v)}' for k, v in nodes.items()]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return path


def write_ui(paths: list[Path]) -> None:
    """UI form through the real frontend; ``param:`` prefixes are dropped from the titles people see."""
    import tempfile

    from comfy_server import ComfyServer
    from frontend import api_to_ui, write_frontend_settings

    server = ComfyServer(Path(tempfile.mkdtemp()))
    write_frontend_settings(server.work_dir / "user")
    with server:
        for path in paths:
            ui = api_to_ui(server.url, json.loads(path.read_text()))
            for node in ui["nodes"]:
                # same seeds on every run: the figures compare variants at equal seeds
                node["widgets_values"] = ["fixed" if v == "randomize" else v for v in node.get("widgets_values", [])]
                title = node.get("title", "")
                if title.startswith("param:"):
                    rest = title.split(" ", 1)
                    if len(rest) == 2:
                        node["title"] = rest[1]
                    else:
                        del node["title"]
            (REPO / "workflows" / path.name).write_text(json.dumps(ui, indent=2) + "\n")


def main() -> None:
    import sys

    sys.path[:0] = [str(REPO), str(REPO / "scripts")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ui", action="store_true", help="also write the UI form through the frontend")
    parser.add_argument("names", nargs="*", default=list(WORKFLOWS))
    args = parser.parse_args()
    paths = [write_api(name, WORKFLOWS[name]()) for name in args.names]
    if args.ui:
        write_ui(paths)
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
