#!/usr/bin/env bash
# Mutation testing of eqdiff_core/ with mutmut (pinned below), outside CI: it takes tens of minutes.
#   bash scripts/mutation.sh                 every module of eqdiff_core/, then the report
#   bash scripts/mutation.sh rra sampling    only these modules (their results are added to earlier ones)
#   bash scripts/mutation.sh --fresh ...     forget earlier results first (mutants/ is rebuilt)
#   bash scripts/mutation.sh --continue training   only the mutants without a result (after a timeout)
#   bash scripts/mutation.sh --report        only write the report from the results so far
# Each mutant of a function is run against the tests/unit tests that reach that function (mutmut
# records which tests call what); killed = a test failed. The report, reports/mutation.json, has per
# module killed / survived / no tests / timeout, the score, the date and the tool version, and every
# surviving mutant with its diff, marked equivalent where scripts/mutation_equivalent.json says why, or
# GPU-only where scripts/mutation_gpu_only.json names the cuda-marked test that kills it on a GPU.
# Setup: .mutation/venv (mutmut from the package registry, the test venv's packages through a .pth
# file), so the test venv is left as it is; no network after that. mutmut works in mutants/ (ignored).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MUTMUT_VERSION=3.8.1
bash "$REPO/scripts/setup_env.sh"
cd "$REPO"
# the tests run inside mutants/, where tests/comfy_env.py would look for .comfy: point it at this one
export EQDIFF_ENV=${EQDIFF_ENV:-$REPO/.comfy}
# mutmut forks a process per mutant; a fork of a process whose OpenMP (torch) or tokenizers thread pool
# is running deadlocks, which mutmut then records as a timeout: one thread each, --max-children for speed
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
VPY=$EQDIFF_ENV/venv/bin/python
MDIR=$REPO/.mutation
MPY=$MDIR/venv/bin/python
PYTEST_VERSION=$("$VPY" -c "import pytest; print(pytest.__version__)")
SITE=$("$VPY" -c "import site; print(site.getsitepackages()[0])")
STAMP="mutmut==$MUTMUT_VERSION pytest==$PYTEST_VERSION $SITE"
if [ "$(cat "$MDIR/.stamp" 2>/dev/null)" != "$STAMP" ]; then
  echo "[mutation] building $MDIR/venv (mutmut $MUTMUT_VERSION)"
  rm -rf "$MDIR/venv"
  "$("$VPY" -c "import sys; print(sys._base_executable)")" -m venv "$MDIR/venv"
  # the same pytest as the test venv, so the tests run as they do in scripts/test.sh
  "$MPY" -m pip install -q "mutmut==$MUTMUT_VERSION" "pytest==$PYTEST_VERSION"
  # torch, numpy, ComfyUI's requirements ... from the test venv, after this venv's own packages
  echo "$SITE" > "$("$MPY" -c "import site; print(site.getsitepackages()[0])")/eqdiff-test-venv.pth"
  echo "$STAMP" > "$MDIR/.stamp"
fi

MODULES=()
REPORT_ONLY=0
CONTINUE=0
for arg in "$@"; do
  case "$arg" in
    --fresh) rm -rf "$REPO/mutants" ;;
    --report) REPORT_ONLY=1 ;;
    --continue) CONTINUE=1 ;;
    -*) echo "mutation.sh: unknown option $arg (accepted: --fresh, --continue, --report, module names)" >&2; exit 2 ;;
    *) [ -f "eqdiff_core/$arg.py" ] || { echo "mutation.sh: no module eqdiff_core/$arg.py" >&2; exit 2; }
       MODULES+=("$arg") ;;
  esac
done
if [ $REPORT_ONLY -eq 0 ]; then
  [ ${#MODULES[@]} -gt 0 ] || for f in eqdiff_core/*.py; do
    m=$(basename "$f" .py); [ "$m" = __init__ ] || MODULES+=("$m")
  done
  PATTERNS=()
  for m in "${MODULES[@]}"; do PATTERNS+=("eqdiff_core.$m.*"); done
  if [ $CONTINUE -eq 1 ] && [ -d mutants ]; then
    mapfile -t PATTERNS < <("$MPY" scripts/mutation_report.py --unchecked "${MODULES[@]}")
    [ ${#PATTERNS[@]} -gt 0 ] || { echo "[mutation] every mutant of ${MODULES[*]} has a result"; PATTERNS=(); }
  fi
  echo "[mutation] ${MODULES[*]}"
  # one run for all the modules asked for: the test statistics are collected once. mutmut exits
  # non-zero when mutants survive; the report says which
  [ ${#PATTERNS[@]} -eq 0 ] || "$MDIR/venv/bin/mutmut" run --max-children "${EQDIFF_MUTATION_JOBS:-2}" "${PATTERNS[@]}" || true
fi
"$MPY" scripts/mutation_report.py --out reports/mutation.json --mutmut-version "$MUTMUT_VERSION" \
  --equivalent scripts/mutation_equivalent.json --gpu-only scripts/mutation_gpu_only.json
