"""The V3 node API. ``comfy_api.latest`` is what ComfyUI's own nodes import, on every release the
pack supports; the versioned ``comfy_api.v0_0_x`` modules differ between releases."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io, ui

__all__ = ["ComfyExtension", "io", "ui", "check_choices", "check_range", "require_choices"]

# How ComfyUI validates a prompt, which shapes these helpers:
# - an input named in ``validate_inputs`` (or all of them, if it takes **kwargs) loses the built-in
#   min / max and combo checks;
# - a message returned by ``validate_inputs`` is reported under every input it names, so each node's
#   ``validate_inputs`` names only the inputs its checks are about (the frontend marks those);
# - ComfyUI checks V3 combo values itself only from 0.8 on, so nodes also check them when they run.


def check_choices(node_cls, **values) -> bool | str:
    """Every given combo value must be one of the node's options. Linked inputs arrive as None and are
    checked when they run."""
    options = {inp.id: inp.options for inp in node_cls.define_schema().inputs if getattr(inp, "options", None)}
    for name, value in values.items():
        if value is not None and value not in options[name]:
            return f"{name}: {value!r} is not one of {', '.join(map(str, options[name]))}"
    return True


def check_range(node_cls, **values) -> bool | str:
    """``validate_inputs`` helper: numbers within the min / max their Int or Float input declares (None:
    no bound; ComfyUI skips that check for inputs named in ``validate_inputs``)."""
    inputs = {inp.id: inp for inp in node_cls.define_schema().inputs}
    for name, value in values.items():
        if value is None:
            continue
        low, high = inputs[name].min, inputs[name].max
        if low is not None and value < low:
            return f"{name}: {value} is below the minimum {low}"
        if high is not None and value > high:
            return f"{name}: {value} is above the maximum {high}"
    return True


def require_choices(node_cls, **values) -> None:
    """``check_choices`` at run time: raises ValueError naming the input."""
    ok = check_choices(node_cls, **values)
    if ok is not True:
        raise ValueError(ok)
