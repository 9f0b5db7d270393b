"""eqdiff_core.prompts: the shipped lists as the authors' test.py reads them, expansion, errors."""

import pytest

from eqdiff_core import prompts


def test_shipped_lists_are_the_files_lines_stripped_without_blanks():
    for name, file in prompts.SHIPPED.items():
        with open(f"{prompts.PROMPTS_DIR}/{file}", encoding="utf-8") as f:
            want = [line.strip() for line in f if line.strip()]  # test.py: strip, skip blank lines
        lines = prompts.shipped_lines(name)
        assert lines == want and len(lines) > 10 and all("{}" in line for line in lines), name
    assert prompts.shipped_lines("live")[0] == "a {} in the jungle"  # the file's first line


def test_split_lines():
    assert prompts.split_lines("  a {} \r\n\n\t\nb {}\n  ") == ["a {}", "b {}"]


def test_expand_takes_the_range_and_puts_the_subject_in():
    lines = ["a {} in the snow", "{} on the beach", "a {} with {}"]
    assert prompts.expand(lines, " <dog> dog ") == ["a <dog> dog in the snow", "<dog> dog on the beach",
                                                     "a <dog> dog with <dog> dog"]
    assert prompts.expand(lines, "x", first=1) == ["x on the beach", "a x with x"]
    assert prompts.expand(lines, "x", first=1, count=1) == ["x on the beach"]
    assert prompts.expand(lines, "x", first=2, count=1) == ["a x with x"]
    assert prompts.expand(lines, "x", first=0, count=3) == prompts.expand(lines, "x")


@pytest.mark.parametrize("args, message", [
    (([], "x"), r"^custom: no prompts; write one prompt per line"),
    ((["a {}", "b"], "x"), r"^custom: line 2 \('b'\) has no \{\}"),
    ((["a {}"], "x", -1), r"^first_index -1 / count 0: both must be 0 or more"),
    ((["a {}"], "x", 0, -2), r"^first_index 0 / count -2"),
    ((["a {}", "b {}"], "x", 2), r"^first_index: 2 is past the end of the list \(2 prompts, indices 0-1\)"),
    ((["a {}", "b {}"], "x", 1, 2), r"^first_index 1 \+ count 2 goes past the end .* at most 1, or 0"),
    ((["a {}"], "  "), r"^subject: empty"),
])
def test_expand_errors_name_the_input_and_the_fix(args, message):
    with pytest.raises(prompts.PromptListError, match=message):
        prompts.expand(*args, source="custom")


def test_shipped_list_errors(tmp_path):
    with pytest.raises(prompts.PromptListError, match=r"^list: 'other' is not one of live, nolive, style"):
        prompts.shipped_lines("other")
    with pytest.raises(prompts.PromptListError, match=r"^list: the file .*prompt_live.txt is missing"):
        prompts.shipped_lines("live", folder=str(tmp_path))
