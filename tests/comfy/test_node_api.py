"""The validation helpers of nodes/comfyui/node_api.py on a V3 node of known inputs: every message in
full (the text a user sees under the input), both ends of each range, and values after a linked input."""

import pytest

from comfy_env import pack_module


@pytest.fixture(scope="module")
def api(registered_nodes):
    return pack_module("nodes.comfyui.node_api")


@pytest.fixture(scope="module")
def node(api):
    io = api.io

    class Bounded(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="EqDiffTestBounded", inputs=[
                io.Int.Input("count", default=1, min=1, max=10),
                io.Float.Input("unbounded", default=0.0),
                io.Combo.Input("mode", options=["fast", "exact"]),
                io.Combo.Input("size", options=[256, 512]),
            ], outputs=[])

    return Bounded


def test_ranges_include_both_ends_and_name_the_input(api, node):
    assert api.check_range(node, count=1) is True and api.check_range(node, count=10) is True
    assert api.check_range(node, count=0) == "count: 0 is below the minimum 1"
    assert api.check_range(node, count=11) == "count: 11 is above the maximum 10"
    assert api.check_range(node, unbounded=-1e9) is True and api.check_range(node, unbounded=1e9) is True


def test_a_linked_input_is_skipped_and_the_next_still_checked(api, node):
    # linked inputs arrive as None at validation; the values after one are checked all the same
    assert api.check_range(node, unbounded=None, count=11) == "count: 11 is above the maximum 10"
    assert api.check_choices(node, size=None, mode="slow") == "mode: 'slow' is not one of fast, exact"


def test_choices_are_checked_by_value_and_listed_in_the_message(api, node):
    assert api.check_choices(node, mode="exact", size=512) is True
    assert api.check_choices(node, size=384) == "size: 384 is not one of 256, 512"
    api.require_choices(node, mode="fast")
    with pytest.raises(ValueError) as raised:
        api.require_choices(node, mode="exact", size="512")
    assert str(raised.value) == "size: '512' is not one of 256, 512"
