#!/usr/bin/env bash
# Sets everything up (idempotent, including Debian's Chromium) and runs all tests: tests/e2e (server +
# browser), and beside it tests/unit, tests/comfy, then the grounding tests a second time under
# transformers 5.x (the .comfy/tf5 overlay; the venv has 4.57). Exits non-zero if any run fails.
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
# tests/e2e mostly waits on its servers, browser and Ray workers, so tests/unit and tests/comfy (then the
# transformers 5.x pass) run beside it, with one torch thread so that the two do not oversubscribe a small
# machine; their output goes to a log, printed when both are done. They share no folder but models/eqdiff,
# where each writes concepts of its own names.
LOG="$REPO/artifacts/test-unit-comfy.log"
mkdir -p "$(dirname "$LOG")"
echo "[test] tests/unit and tests/comfy run beside tests/e2e; their output: $LOG (printed at the end)"
(
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  r=0
  EQDIFF_EXPECT_TRANSFORMERS=4 "${PYTEST[@]}" tests/unit tests/comfy || r=$?
  echo "[test] grounding tests under transformers 5.x ($ENV_DIR/tf5)"
  EQDIFF_EXPECT_TRANSFORMERS=5 PYTHONPATH="$ENV_DIR/tf5${PYTHONPATH:+:$PYTHONPATH}" \
    "${PYTEST[@]}" tests/unit/test_grounding.py tests/unit/test_grounding_models.py tests/comfy/test_grounding.py || r=$?
  exit $r
) > "$LOG" 2>&1 &
beside=$!
rc=0
EQDIFF_EXPECT_TRANSFORMERS=4 "${PYTEST[@]}" tests/e2e || rc=$?
wait $beside || rc=$?
echo "[test] ---- tests/unit, tests/comfy and the transformers 5.x pass ($LOG) ----"
cat "$LOG"
[ $rc -eq 0 ] && echo "[test] all passed" || echo "[test] FAILED (see above)"
exit $rc
