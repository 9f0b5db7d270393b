#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the main job: ComfyUI headless with this pack, the
# quickstart workflow, and the paths of its outputs. Options: --checkpoint PATH (a real SD1.x
# checkpoint instead of the built-in tiny one), --cpu, --out DIR.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -z "${EQDIFF_COMFY:-}" ] || source "$REPO/scripts/tree_env.sh"  # another ComfyUI tree: exports EQDIFF_ENV
bash "$REPO/scripts/setup_env.sh"
exec "${EQDIFF_ENV:-$REPO/.comfy}/venv/bin/python" "$REPO/scripts/quickstart.py" "$@"
