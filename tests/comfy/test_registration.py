"""The pack registers through ComfyUI's loader (V3 entry point) without import failures."""

import json
import shutil
import subprocess
import sys

from comfy_env import COMFY_DIR, PACK_DIR

# DESIGN.md §2, "Nodes (ids are fixed; inputs may grow)": node id -> display name
DESIGN_NODES = {
    "EqDiffFFTSplit": "FFT Split",
    "EqDiffGroundingLoader": "Grounding Models Loader",
    "EqDiffGroundedMask": "Grounded Mask",
    "EqDiffFDTETrainer": "FDTE Trainer",
    "EqDiffTrainerOptions": "FDTE Trainer Options",
    "EqDiffSaveConcept": "Save Concept",
    "EqDiffLoadConcept": "Load Concept",
    "EqDiffApplyConcept": "Apply Concept",
    "EqDiffRRAPatch": "Residual Reference Attention Patch",
    "EqDiffEquilibratedSampler": "Equilibrated Sampler",
    "EqDiffSampler": "Equilibrated Sampler (SAMPLER)",
    "EqDiffMetrics": "Customization Metrics",
}


def pack_nodes() -> list:
    """The pack's node classes: the list its V3 entry point hands to ComfyUI (nodes.node_list)."""
    from comfy_env import pack_module

    return pack_module("nodes").node_list()


def test_every_node_is_registered_with_its_design_name_and_category(registered_nodes):
    import nodes

    schemas = [cls.GET_SCHEMA() for cls in pack_nodes()]
    ids = [schema.node_id for schema in schemas]
    assert len(ids) == len(set(ids)) and set(DESIGN_NODES) <= set(ids)
    for schema in schemas:
        node_id = schema.node_id
        assert node_id.startswith("EqDiff") and registered_nodes[node_id].GET_SCHEMA().node_id == node_id
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == schema.display_name
        if node_id in DESIGN_NODES:
            assert schema.display_name == DESIGN_NODES[node_id], node_id
        assert schema.category == "EqDiff" or schema.category.startswith("EqDiff/"), node_id
        assert schema.description, f"{node_id} has no description"
        for inp in schema.inputs:
            assert inp.tooltip, f"{node_id}.{inp.id} has no tooltip"


def test_entry_point_is_v3_only():
    source = (PACK_DIR / "__init__.py").read_text()
    assert "NODE_CLASS_MAPPINGS" not in source and "comfy_entrypoint" in source


def test_loading_the_pack_imports_nothing_heavy(tmp_path):
    """In a fresh interpreter, after an empty V3 pack has been loaded the same way (so ComfyUI's
    own loader imports are in place), loading this pack adds only the pack's own modules."""
    baseline = tmp_path / "baseline_pack"
    baseline.mkdir()
    shutil.copy(PACK_DIR / "pyproject.toml", baseline / "pyproject.toml")
    (baseline / "__init__.py").write_text(
        "from comfy_api.latest import ComfyExtension\n"
        "class Ext(ComfyExtension):\n"
        "    async def get_node_list(self):\n"
        "        return []\n"
        "async def comfy_entrypoint():\n"
        "    return Ext()\n"
    )
    probe = f"""
import asyncio, json, sys
sys.path.insert(0, {str(COMFY_DIR)!r})
import comfy.options; comfy.options.enable_args_parsing(False)
import comfy.cli_args; comfy.cli_args.args.cpu = True
import nodes
asyncio.run(nodes.load_custom_node({str(baseline)!r}))
before = set(sys.modules)
ok = asyncio.run(nodes.load_custom_node({str(PACK_DIR)!r}))
print(json.dumps({{"ok": ok, "new": sorted(set(sys.modules) - before)}}))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=COMFY_DIR, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"]
    foreign = [m for m in result["new"] if "eqdiff-nodes" not in m]
    assert foreign == [], f"loading the pack imported {foreign}"
    assert any(m.endswith("eqdiff-nodes.nodes.frequency") for m in result["new"])
