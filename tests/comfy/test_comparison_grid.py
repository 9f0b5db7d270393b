"""EqDiffComparisonGrid in-process: columns in input order under their labels, the error without columns."""

import pytest
import torch

from comfy_env import pack_module


@pytest.fixture
def node(registered_nodes):
    return registered_nodes["EqDiffComparisonGrid"]


def test_columns_follow_the_inputs_and_labels_fall_back_to_input_names(node):
    grid_module = pack_module("eqdiff_core.comparison")
    red = torch.zeros(2, 8, 8, 3)
    red[..., 0] = 1
    blue = torch.zeros(1, 8, 8, 3)
    blue[..., 2] = 1
    # column_3 then column_1 given as keywords: the sheet must still put column_1 first
    # blank lines and spaces around a label are not labels
    sheet = node.execute(labels="\n first\n\n", row_labels="p1\n\n p2 ", column_3=blue, column_1=red).result[0]
    expected = grid_module.comparison_grid([("first", red), ("column_3", blue)], ["p1", "p2"])
    assert torch.equal(sheet, expected)


def test_no_connected_column_is_an_error_naming_the_inputs(node):
    with pytest.raises(ValueError, match="column_1 ... column_6"):
        node.execute(labels="a")
