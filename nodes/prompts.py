"""Prompt List: the paper's evaluation prompts (or your own) as a ComfyUI output list."""

from __future__ import annotations

from ..eqdiff_core import prompts as core
from .comfyui.node_api import check_choices, check_range, io

LISTS = [*core.SHIPPED, "custom"]


def _prompts(list_name: str, subject: str, custom_prompts: str, first_index: int, count: int) -> list[str]:
    if list_name == "custom":
        lines, source = core.split_lines(custom_prompts), "custom_prompts"
    else:
        lines, source = core.shipped_lines(list_name), f"list '{list_name}'"
    return core.expand(lines, subject, first_index, count, source=source)


class EqDiffPromptList(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffPromptList",
            display_name="Prompt List",
            category="EqDiff/evaluation",
            description=(
                "EqDiff's evaluation prompts (live subjects, objects, styles; 55 / 55 / 22 prompts from the authors' "
                "repository) or your own, with {} replaced by the subject phrase. 'prompt' is a list: the nodes after "
                "it (CLIP Text Encode, the sampler, VAE Decode) run once per prompt; Rebatch Images turns their images "
                "back into one batch. 'prompts' is every prompt on its own line, for Customization Metrics."
            ),
            inputs=[
                io.Combo.Input("list", options=LISTS, default="nolive",
                               tooltip="live: 55 prompts for animals (accessories, outfits); nolive: 55 for objects; "
                               "style: 22 artistic styles (the paper's lists, workflows/prompts/); custom: the lines "
                               "of custom_prompts."),
                io.String.Input("subject", default="<backpack_dog> backpack",
                                tooltip="What {} becomes: the concept token and the class word, e.g. "
                                "'<backpack_dog> backpack' (link Apply Concept's token to write it yourself)."),
                io.String.Input("custom_prompts", multiline=True, default="a {} in the jungle\na {} on the beach",
                                tooltip="With list 'custom': one prompt per line, {} where the subject goes. Ignored "
                                "for the shipped lists."),
                io.Int.Input("first_index", default=0, min=0, max=9999,
                             tooltip="Index of the first prompt to take (0 = the first line)."),
                io.Int.Input("count", default=0, min=0, max=9999,
                             tooltip="How many prompts to take from first_index; 0 = all to the end."),
                io.Int.Input("images_per_prompt", default=1, min=1, max=4096,
                             tooltip="Set to the Empty Latent's batch_size: each line of 'prompts' is repeated this "
                             "many times so that it matches the generated batch image for image."),
            ],
            outputs=[
                io.String.Output("prompt", display_name="prompt", is_output_list=True,
                                 tooltip="The prompts as a list: what it connects to runs once per prompt."),
                io.String.Output("prompts", display_name="prompts",
                                 tooltip="All prompts, one line per generated image in order (for Customization "
                                 "Metrics' prompts)."),
                io.Int.Output("prompt_count", display_name="count", tooltip="How many prompts."),
            ],
        )

    @classmethod
    def validate_inputs(cls, list, subject, custom_prompts, first_index, count) -> bool | str:
        for ok in (check_choices(cls, list=list), check_range(cls, first_index=first_index, count=count)):
            if ok is not True:
                return ok
        if None in (list, subject, custom_prompts, first_index, count):
            return True  # a linked input: checked when the node runs
        try:
            _prompts(list, subject, custom_prompts, first_index, count)
        except core.PromptListError as err:
            return str(err)
        return True

    @classmethod
    def execute(cls, list, subject, custom_prompts, first_index, count, images_per_prompt) -> io.NodeOutput:
        prompts = _prompts(list, subject, custom_prompts, first_index, count)
        lines = [p for p in prompts for _ in range(images_per_prompt)]
        return io.NodeOutput(prompts, "\n".join(lines), len(prompts))


NODES = [EqDiffPromptList]
