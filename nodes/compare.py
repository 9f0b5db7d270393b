"""Comparison Grid: the outputs of several methods side by side, labelled."""

from __future__ import annotations

from ..eqdiff_core.comparison import comparison_grid
from .comfyui.node_api import io

MAX_COLUMNS = 6


class EqDiffComparisonGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EqDiffComparisonGrid",
            display_name="Comparison Grid",
            category="EqDiff",
            description="Puts the images of up to six methods side by side: one labelled column per method, "
                        "row i holding each column's image i (the same prompt and seed across a row).",
            inputs=[
                io.String.Input("labels", multiline=True, default="EqDiff\nEqDiff + DCI\nEqDiff + ICO\nPureCC",
                                tooltip="One label per connected column, top to bottom in the order of the "
                                        "inputs; missing labels are the input names."),
                io.String.Input("row_labels", multiline=True, default="", optional=True,
                                tooltip="Optional text under each row (e.g. the prompts, one per line). Connect "
                                        "a Prompt List's prompts output here."),
                *[io.Image.Input(f"column_{i}", optional=True, tooltip=f"Images of method {i} (a batch, one per row).")
                  for i in range(1, MAX_COLUMNS + 1)],
            ],
            outputs=[io.Image.Output("grid", display_name="grid", tooltip="The comparison sheet.")],
        )

    @classmethod
    def execute(cls, labels: str, row_labels: str = "", **columns) -> io.NodeOutput:
        connected = [(name, columns[name]) for name in sorted(columns) if columns[name] is not None]
        if not connected:
            raise ValueError("Comparison Grid: connect at least one of column_1 ... column_6 to images.")
        names = [line.strip() for line in labels.splitlines() if line.strip()]
        labelled = [(names[i] if i < len(names) else name, images) for i, (name, images) in enumerate(connected)]
        rows = [line.strip() for line in (row_labels or "").splitlines() if line.strip()]
        return io.NodeOutput(comparison_grid(labelled, rows))


NODES = [EqDiffComparisonGrid]
