"""Evaluation prompt lists: the paper's lists shipped in ``workflows/prompts/`` and custom ones.

A list is one prompt per line in which ``{}`` stands for the subject phrase (``a {} in the jungle`` with
``<backpack_dog> backpack`` gives ``a <backpack_dog> backpack in the jungle``). Blank lines are skipped and
each line is stripped, as the authors' ``test.py`` reads them.
"""

from __future__ import annotations

import os

PLACEHOLDER = "{}"
# workflows/prompts/ of this repository: eqdiff_core/ and workflows/ sit side by side
PROMPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "prompts")
# the list's name -> its file, with what it is for (EqDiff's test.py: live subjects, objects, styles)
SHIPPED = {"live": "prompt_live.txt", "nolive": "prompt_nolive.txt", "style": "prompt_style.txt"}


class PromptListError(ValueError):
    """A prompt list that cannot be used, stated for the user (the input and the fix)."""


def split_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def shipped_lines(name: str, folder: str = PROMPTS_DIR) -> list[str]:
    """The lines of a shipped list (``live``, ``nolive`` or ``style``)."""
    if name not in SHIPPED:
        raise PromptListError(f"list: '{name}' is not one of {', '.join(SHIPPED)}")
    path = os.path.join(folder, SHIPPED[name])
    if not os.path.isfile(path):
        raise PromptListError(f"list: the file {path} is missing; reinstall the node pack (workflows/prompts/ "
                              "holds the shipped lists)")
    with open(path, encoding="utf-8") as f:
        return split_lines(f.read())


def expand(lines: list[str], subject: str, first: int = 0, count: int = 0, source: str = "list") -> list[str]:
    """Lines ``first`` .. ``first + count - 1`` (``count`` 0: to the end) with ``{}`` replaced by ``subject``."""
    if not lines:
        raise PromptListError(f"{source}: no prompts; write one prompt per line with {{}} where the subject goes")
    without = [i for i, line in enumerate(lines) if PLACEHOLDER not in line]
    if without:
        raise PromptListError(f"{source}: line {without[0] + 1} ('{lines[without[0]]}') has no {{}}; write {{}} "
                              "where the subject goes, e.g. 'a {} in the jungle'")
    if first < 0 or count < 0:
        raise PromptListError(f"first_index {first} / count {count}: both must be 0 or more")
    if first >= len(lines):
        raise PromptListError(f"first_index: {first} is past the end of the list ({len(lines)} prompts, indices "
                              f"0-{len(lines) - 1}); lower it")
    end = len(lines) if count == 0 else first + count
    if end > len(lines):
        raise PromptListError(f"first_index {first} + count {count} goes past the end of the list ({len(lines)} "
                              f"prompts); lower count to at most {len(lines) - first}, or 0 for all from first_index")
    if not subject.strip():
        raise PromptListError("subject: empty; write the subject phrase, the concept token and the class word, "
                              "e.g. '<backpack_dog> backpack'")
    return [line.replace(PLACEHOLDER, subject.strip()) for line in lines[first:end]]
