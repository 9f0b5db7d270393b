"""The ``param:`` convention: a workflow node whose ``_meta.title`` starts with ``param:`` receives values
from the runner. ``param:NAME[,NAME...]`` optionally followed by a space and any text (``param:seed,steps
Equilibrated Sampler``). Each NAME sets these inputs of that node (every one of them the node has):

    checkpoint  ckpt_name         --checkpoint (left as in the workflow when not given)
    concept     concept_name      --concept with {subject} filled in (default "{subject}.safetensors")
    token       token             --token with {subject} filled in (default "<{subject}>")
    reference   image             the subject's photo number --reference-index, uploaded to the server
    prompt      text              the prompt line, "{}" replaced by "<token> <class word>"
    seed        seed, noise_seed  each of --seeds
    steps       steps             --steps (left as in the workflow when not given)
    size        width, height     --size (left as in the workflow when not given)
    output      filename_prefix   a per-job prefix under eqdiff_runner/; only the images of these nodes are
                                  collected
    subject     folder            the subject's photos (and masks/<photo>.png, if the subject folder has
                                  them), uploaded to the server's input/eqdiff_runner/<subject>/ (Load
                                  Subject Photos)
    class_word  class_word,       the subject's class word (FDTE Trainer; Class Images' prompt, the class
                class_prompt      word alone as the authors')
    name        name              --name with {subject} filled in (default "{subject}"; FDTE Trainer, Save
                                  Concept)
    train_steps steps             --train-steps (FDTE Trainer; left as in the workflow when not given)
    train_size  size, resolution  --train-size (Load Subject Photos' size, FDTE Trainer Options' resolution)
    train_precision precision     --train-precision (FDTE Trainer: fp32 on a CPU or a GPU without bf16)
    class_images count            --class-images (Class Images: how many for prior preservation)

A sampling workflow needs ``param:prompt`` and ``param:output``; a training workflow (``--train-workflow``)
needs ``param:subject`` and a Save Concept titled ``param:name``. A Prompt List (EqDiffPromptList) titled
``param:prompt`` gets a whole prompt file (list "custom", every line, the subject phrase). Only the nodes
that lead to what the runner collects are queued (the param:output images, a training workflow's Save
Concept): previews and on-server metrics of a shipped workflow are left out.
"""

from __future__ import annotations

import json
import re

TITLE = re.compile(r"^param:([\w,]+)(?:\s.*)?$", re.S)
TITLE_REST = re.compile(r"^param:[\w,]+\s*")
PARAM_INPUTS = {
    "checkpoint": ("ckpt_name",), "concept": ("concept_name",), "token": ("token",), "reference": ("image",),
    "prompt": ("text",), "seed": ("seed", "noise_seed"), "steps": ("steps",), "size": ("width", "height"),
    "output": ("filename_prefix",), "subject": ("folder",), "class_word": ("class_word", "class_prompt"), "name": ("name",),
    "train_steps": ("steps",), "train_size": ("size", "resolution"), "train_precision": ("precision",),
    "class_images": ("count",),
}
PROMPT_LIST = "EqDiffPromptList"
SAVE_CONCEPT = "EqDiffSaveConcept"
SAMPLING_PARAMS = ("prompt", "output")
TRAINING_PARAMS = ("subject", "name")


class RunnerError(RuntimeError):
    """A problem with the arguments, the workflow or the out folder, stated for the user."""


def find_params(workflow: dict, required: tuple[str, ...] = SAMPLING_PARAMS, role: str = "--workflow") -> dict[str, list[str]]:
    """Parameter name -> ids of the nodes titled ``param:...`` that carry it; checks the convention."""
    params: dict[str, list[str]] = {}
    for node_id, node in workflow.items():
        m = TITLE.match(node.get("_meta", {}).get("title", ""))
        if not m:
            continue
        for name in filter(None, m.group(1).split(",")):
            if name not in PARAM_INPUTS:
                raise RunnerError(f"{role} node {node_id}: unknown parameter '{name}' in its title; known: "
                                  f"{', '.join(PARAM_INPUTS)}")
            if node.get("class_type") == PROMPT_LIST and name != "prompt":
                raise RunnerError(f"{role} node {node_id} (Prompt List) is titled param:{name}; a Prompt List "
                                  "can only be param:prompt")
            if name == "prompt" and node.get("class_type") == PROMPT_LIST:
                pass  # filled by fill_prompt_list
            elif not any(i in node.get("inputs", {}) for i in PARAM_INPUTS[name]):
                raise RunnerError(f"{role} node {node_id} ({node.get('class_type')}) is titled param:{name} but "
                                  f"has none of the inputs {', '.join(PARAM_INPUTS[name])}")
            params.setdefault(name, []).append(node_id)
    lists = [k for k, node in workflow.items() if node.get("class_type") == PROMPT_LIST]
    if lists and set(params.get("prompt", [])) != set(lists):
        raise RunnerError(f"{role} nodes {', '.join(lists)}: a workflow with a Prompt List must title it (and only "
                          "it) param:prompt, so that the runner fills in each prompt file")
    missing = [p for p in required if p not in params]
    if missing:
        raise RunnerError(f"{role} has no node titled {' or '.join('param:' + p for p in missing)}; see "
                          "'param:' in --help for the titles a workflow needs")
    if "name" in required and not concept_savers(workflow, params):
        raise RunnerError(f"{role} has no Save Concept ({SAVE_CONCEPT}) titled param:name; the runner collects "
                          "the concept it writes")
    return params


def concept_savers(workflow: dict, params: dict[str, list[str]]) -> list[str]:
    return [k for k in params.get("name", []) if workflow[k].get("class_type") == SAVE_CONCEPT]


def output_names(workflow: dict, params: dict[str, list[str]]) -> dict[str, str]:
    """A file-name-safe label per param:output node: its title after the param: part (else its id),
    made unique with the id."""
    labels: dict[str, str] = {}
    for node_id in params.get("output", []):
        rest = TITLE_REST.sub("", workflow[node_id].get("_meta", {}).get("title", ""))
        label = re.sub(r"[^\w.-]+", "_", rest).strip("_") or f"node{node_id}"
        labels[node_id] = f"{label}_{node_id}" if label in labels.values() else label
    return labels


def uses_prompt_list(workflow: dict, params: dict[str, list[str]]) -> bool:
    return any(workflow[k].get("class_type") == PROMPT_LIST for k in params.get("prompt", []))


def fill_prompt_list(workflow: dict, params: dict[str, list[str]], lines: list[str], phrase: str) -> dict:
    """The Prompt List(s) titled param:prompt set to every line of a prompt file with this subject phrase."""
    for node_id in params.get("prompt", []):
        inputs = workflow[node_id]["inputs"]
        inputs.update({"list": "custom", "custom_prompts": "\n".join(lines), "subject": phrase, "first_index": 0,
                       "count": 0})
    return workflow


def fill(workflow: dict, params: dict[str, list[str]], values: dict) -> dict:
    """A copy of the workflow with each parameter in ``values`` written to its nodes' inputs."""
    filled = json.loads(json.dumps(workflow))
    for name, value in values.items():
        for node_id in params.get(name, []):
            if filled[node_id].get("class_type") == PROMPT_LIST:
                continue  # fill_prompt_list
            inputs = filled[node_id]["inputs"]
            for key in PARAM_INPUTS[name]:
                if key in inputs:
                    inputs[key] = value
    return filled


def needed_by(workflow: dict, targets: list[str]) -> dict:
    """The workflow reduced to ``targets`` and every node they read from (links are ``[node_id, index]``)."""
    keep, todo = set(), list(targets)
    while todo:
        node_id = todo.pop()
        if node_id in keep:
            continue
        keep.add(node_id)
        todo += [v[0] for v in workflow[node_id].get("inputs", {}).values()
                 if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] in workflow]
    return {k: v for k, v in workflow.items() if k in keep}
