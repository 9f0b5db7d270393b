"""EqDiffPromptList in-process: the shipped lists, subsets, the list output as ComfyUI sees it, errors."""

import pytest

from comfy_env import REPO

SHIPPED = REPO / "workflows" / "prompts"
DEFAULTS = dict(list="nolive", subject="<backpack_dog> backpack", custom_prompts="a {} in the jungle",
                first_index=0, count=0, images_per_prompt=1)


@pytest.fixture
def node(registered_nodes):
    return registered_nodes["EqDiffPromptList"]


def run(node, **overrides):
    return node.execute(**{**DEFAULTS, **overrides}).result


def file_lines(name):
    return [line.strip() for line in (SHIPPED / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_schema_list_output_and_documentation(node):
    import nodes

    schema = node.define_schema()
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["EqDiffPromptList"] == "Prompt List"
    assert schema.category == "EqDiff/evaluation" and schema.description
    assert all(inp.tooltip for inp in schema.inputs) and all(out.tooltip for out in schema.outputs)
    # what ComfyUI's executor reads: only 'prompt' is a list, so the nodes after it run once per prompt
    assert tuple(node.OUTPUT_IS_LIST) == (True, False, False)
    assert tuple(node.RETURN_TYPES) == ("STRING", "STRING", "INT")
    assert [inp.options for inp in schema.inputs if inp.id == "list"] == [["live", "nolive", "style", "custom"]]


@pytest.mark.parametrize("name,file,size", [("live", "prompt_live.txt", 55), ("nolive", "prompt_nolive.txt", 55),
                                            ("style", "prompt_style.txt", 22)])
def test_shipped_lists_are_the_papers(node, name, file, size):
    prompts, joined, count = run(node, list=name)
    lines = file_lines(file)
    assert count == len(prompts) == len(lines) == size
    assert prompts == [line.replace("{}", "<backpack_dog> backpack") for line in lines]
    assert joined == "\n".join(prompts)
    assert all("{}" not in p and "<backpack_dog> backpack" in p for p in prompts)


def test_subset_and_images_per_prompt(node):
    prompts, joined, count = run(node, first_index=2, count=3, images_per_prompt=2)
    assert prompts == ["a <backpack_dog> backpack on the beach", "a <backpack_dog> backpack on a cobblestone street",
                       "a <backpack_dog> backpack on top of pink fabric"]
    assert count == 3
    assert joined.splitlines() == [p for p in prompts for _ in range(2)]
    last = run(node, first_index=54, count=1)[0]
    assert last == ["a <backpack_dog> backpack seen from the side"]


def test_custom_list(node):
    text = "  a {} in the snow \n\nwatercolor painting of a {}\n{} and another {}\n"
    prompts, joined, count = run(node, list="custom", custom_prompts=text, subject=" <sks> dog ")
    assert prompts == ["a <sks> dog in the snow", "watercolor painting of a <sks> dog", "<sks> dog and another <sks> dog"]
    assert count == 3 and joined.count("\n") == 2


@pytest.mark.parametrize("overrides,message", [
    (dict(list="custom", custom_prompts="a {} in the snow\na dog on the beach"),
     "custom_prompts: line 2 ('a dog on the beach') has no {}"),
    (dict(list="custom", custom_prompts="\n  \n"), "custom_prompts: no prompts"),
    (dict(list="style", first_index=22), "first_index: 22 is past the end of the list (22 prompts, indices 0-21)"),
    (dict(list="style", first_index=20, count=3), "lower count to at most 2"),
    (dict(subject="  "), "subject: empty"),
])
def test_errors_name_the_input_and_the_fix(node, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("{}", r"\{\}")):
        run(node, **overrides)
    inputs = {k: v for k, v in {**DEFAULTS, **overrides}.items() if k != "images_per_prompt"}
    assert message in node.validate_inputs(**inputs)  # refused when the prompt is queued, before anything runs


def test_validation_accepts_good_and_linked_inputs_and_refuses_unknown_lists(node):
    assert node.validate_inputs(**{k: v for k, v in DEFAULTS.items() if k != "images_per_prompt"}) is True
    assert node.validate_inputs(list="custom", subject=None, custom_prompts="a dog", first_index=0, count=0) is True
    unknown = node.validate_inputs(list="animals", subject="<x> dog", custom_prompts="", first_index=0, count=0)
    assert unknown.startswith("list: 'animals' is not one of live, nolive, style, custom")
    assert node.validate_inputs(list="live", subject="<x> dog", custom_prompts="", first_index=-1, count=0) == \
        "first_index: -1 is below the minimum 0"  # the built-in check is off for inputs validate_inputs names
    # a custom text without {} does not matter for the shipped lists
    assert node.validate_inputs(list="live", subject="<x> dog", custom_prompts="no placeholder", first_index=0,
                                count=5) is True
