"""The pack registers through ComfyUI's loader (V3 entry point) without import failures."""

import json
import shutil
import subprocess
import sys

from comfy_env import COMFY_DIR, PACK_DIR

NODE_IDS = {"EqDiffFFTSplit", "EqDiffLoadConcept", "EqDiffApplyConcept", "EqDiffRRAPatch",
            "EqDiffEquilibratedSampler", "EqDiffSampler"}


def test_every_node_id_is_registered(registered_nodes):
    import nodes

    assert NODE_IDS <= set(registered_nodes)
    for node_id in NODE_IDS:
        cls = registered_nodes[node_id]
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        schema = cls.GET_SCHEMA()
        assert schema.node_id == node_id and schema.description and schema.category == "EqDiff"
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
