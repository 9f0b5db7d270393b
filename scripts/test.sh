#!/usr/bin/env bash
# Sets everything up (idempotent, including Debian's Chromium) and runs all tests:
# tests/unit, tests/comfy, tests/e2e (server + browser), then the grounding tests a second time under
# transformers 5.x (the .comfy/tf5 overlay; the venv has 4.57). Exits non-zero if either run fails.
# Extra arguments go to a single pytest run instead.
# Against another ComfyUI tree: EQDIFF_COMFY=/path/to/ComfyUI [EQDIFF_PYTHON=python3.X] bash scripts/test.sh
# (an environment of its own under .comfy-envs/, see scripts/tree_env.sh).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -z "${EQDIFF_COMFY:-}" ] || source "$REPO/scripts/tree_env.sh"  # exports EQDIFF_ENV for the tree
bash "$REPO/scripts/setup_env.sh" --browser
cd "$REPO"
ENV_DIR=${EQDIFF_ENV:-$REPO/.comfy}
PYTEST=("$ENV_DIR/venv/bin/python" -m pytest -c tests/pytest.ini --rootdir tests)
[ $# -eq 0 ] || exec "${PYTEST[@]}" "$@"
rc=0
EQDIFF_EXPECT_TRANSFORMERS=4 "${PYTEST[@]}" tests || rc=$?
echo "[test] grounding tests under transformers 5.x ($ENV_DIR/tf5)"
EQDIFF_EXPECT_TRANSFORMERS=5 PYTHONPATH="$ENV_DIR/tf5${PYTHONPATH:+:$PYTHONPATH}" \
  "${PYTEST[@]}" tests/unit/test_grounding.py tests/unit/test_grounding_models.py tests/comfy/test_grounding.py || rc=$?
exit $rc
