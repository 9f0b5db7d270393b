"""eqdiff_core.prompts: the shipped lists as the authors' test.py reads them, expansion, errors."""

import locale
import re

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
    ((["a {}", "b"], "x"), "^" + re.escape("custom: line 2 ('b') has no {}; write {} where the subject goes, "
                                           "e.g. 'a {} in the jungle'") + "$"),
    ((["a {}"], "x", -1), r"^first_index -1 / count 0: both must be 0 or more"),
    ((["a {}"], "x", 0, -2), r"^first_index 0 / count -2"),
    ((["a {}", "b {}"], "x", 2), r"^first_index: 2 is past the end of the list \(2 prompts, indices 0-1\)"),
    ((["a {}", "b {}"], "x", 1, 2), r"^first_index 1 \+ count 2 goes past the end .* at most 1, or 0"),
    ((["a {}"], "  "), "^" + re.escape("subject: empty; write the subject phrase, the concept token and the class "
                                       "word, e.g. '<backpack_dog> backpack'") + "$"),
])
def test_expand_errors_name_the_input_and_the_fix(args, message):
    with pytest.raises(prompts.PromptListError, match=message):
        prompts.expand(*args, source="custom")


def test_expand_names_the_list_when_no_source_is_given():
    with pytest.raises(prompts.PromptListError, match=r"^list: no prompts; "):
        prompts.expand([], "x")


def test_shipped_list_errors(tmp_path):
    with pytest.raises(prompts.PromptListError, match=r"^list: 'other' is not one of live, nolive, style"):
        prompts.shipped_lines("other")
    missing = tmp_path / "prompt_live.txt"
    with pytest.raises(prompts.PromptListError, match="^" + re.escape(
            f"list: the file {missing} is missing; reinstall the node pack (workflows/prompts/ holds the shipped "
            "lists)") + "$"):
        prompts.shipped_lines("live", folder=str(tmp_path))


def test_shipped_lists_are_read_as_utf8_in_any_locale(tmp_path):
    """Under the C locale open() without an encoding reads ASCII; the lists are UTF-8 whatever the locale."""
    (tmp_path / "prompt_style.txt").write_bytes("a {} in the style of Gauguin, café\n".encode("utf-8"))
    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        lines = prompts.shipped_lines("style", folder=str(tmp_path))
    finally:
        locale.setlocale(locale.LC_CTYPE, old)
    assert lines == ["a {} in the style of Gauguin, café"]
