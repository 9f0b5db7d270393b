#!/usr/bin/env bash
# Mutation testing of eqdiff_core/ and of the ComfyUI boundary, nodes/comfyui/, with mutmut (pinned
# below), outside CI: it takes tens of minutes to hours.
#   bash scripts/mutation.sh                 every module of eqdiff_core/, then the report
#   bash scripts/mutation.sh --boundary [tokens ...]   nodes/comfyui/ (or these of its modules) with
#                                            tests/comfy; report reports/mutation-boundary.json
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

# Two targets, each with its own mutants/ and report:
#   eqdiff_core/   with tests/unit, in the repository itself (setup.cfg)
#   nodes/comfyui/ with tests/comfy (--boundary), in a copy of the repository, .mutation/boundary/
#                  (scripts/mutation_boundary.cfg as its setup.cfg), so both targets' results are kept;
#                  ComfyUI (.comfy) loads the pack from that copy's mutants/ through its custom-node
#                  loader, with the models of .comfy (an environment of links, .mutation/comfy-env/)
MODULES=()
REPORT_ONLY=0
CONTINUE=0
FRESH=0
SOURCE=eqdiff_core
for arg in "$@"; do
  case "$arg" in
    --boundary) SOURCE=nodes/comfyui ;;
    --fresh) FRESH=1 ;;
    --report) REPORT_ONLY=1 ;;
    --continue) CONTINUE=1 ;;
    -*) echo "mutation.sh: unknown option $arg (accepted: --boundary, --fresh, --continue, --report, module names)" >&2; exit 2 ;;
    *) MODULES+=("$arg") ;;
  esac
done
for m in "${MODULES[@]}"; do
  [ -f "$SOURCE/$m.py" ] || { echo "mutation.sh: no module $SOURCE/$m.py" >&2; exit 2; }
done
if [ "$SOURCE" = eqdiff_core ]; then
  WORK=$REPO
  REPORT=$REPO/reports/mutation.json
  TESTS_FOLDER=tests/unit
  TESTS="$TESTS_FOLDER (the tests that reach each mutated function)"
else
  WORK=$MDIR/boundary
  REPORT=$REPO/reports/mutation-boundary.json
  TESTS_FOLDER=tests/comfy
  TESTS="$TESTS_FOLDER (the tests that reach each mutated function), in-process ComfyUI $(sed -n -E 's/^__version__ = "([^"]+)".*/\1/p' "$EQDIFF_ENV/ComfyUI/comfyui_version.py")"
  mkdir -p "$WORK"
  # the tracked and new files of the repository (not the ignored ones: no venvs, no mutants/); the copy's
  # own files go first, so that a file deleted from the repository is gone there too
  find "$WORK" -mindepth 1 -maxdepth 1 ! -name mutants -exec rm -rf {} +
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK"
  cp scripts/mutation_boundary.cfg "$WORK/setup.cfg"
  CENV=$MDIR/comfy-env
  mkdir -p "$CENV/base/custom_nodes" "$CENV/base/models"
  ln -sfn "$EQDIFF_ENV/ComfyUI" "$CENV/ComfyUI"
  ln -sfn "$EQDIFF_ENV/venv" "$CENV/venv"
  ln -sfn "$WORK/mutants" "$CENV/base/custom_nodes/eqdiff-nodes"
  MODELS=$EQDIFF_ENV/ComfyUI/models
  [ ! -d "$EQDIFF_ENV/base/models" ] || MODELS=$EQDIFF_ENV/base/models
  for d in "$MODELS"/*/; do ln -sfn "${d%/}" "$CENV/base/models/$(basename "$d")"; done
  export EQDIFF_ENV=$CENV PYTHONPATH=$WORK/scripts${PYTHONPATH:+:$PYTHONPATH}
fi
cd "$WORK"
[ $FRESH -eq 0 ] || rm -rf mutants
REPORT_ARGS=(--source "$SOURCE" --tests "$TESTS" --tests-folder "$TESTS_FOLDER" --out "$REPORT" --mutmut-version "$MUTMUT_VERSION"
             --equivalent "$REPO/scripts/mutation_equivalent.json" --gpu-only "$REPO/scripts/mutation_gpu_only.json")
if [ $REPORT_ONLY -eq 0 ]; then
  [ ${#MODULES[@]} -gt 0 ] || for f in "$SOURCE"/*.py; do
    m=$(basename "$f" .py); [ "$m" = __init__ ] || MODULES+=("$m")
  done
  PATTERNS=()
  for m in "${MODULES[@]}"; do PATTERNS+=("${SOURCE//\//.}.$m.*"); done
  if [ $CONTINUE -eq 1 ] && [ -d mutants ]; then
    mapfile -t PATTERNS < <("$MPY" "$REPO/scripts/mutation_report.py" --source "$SOURCE" --unchecked "${MODULES[@]}")
    [ ${#PATTERNS[@]} -gt 0 ] || { echo "[mutation] every mutant of ${MODULES[*]} has a result"; PATTERNS=(); }
  fi
  echo "[mutation] $SOURCE: ${MODULES[*]}"
  # one run for all the modules asked for: the test statistics are collected once. mutmut exits
  # non-zero when mutants survive; the report says which
  [ ${#PATTERNS[@]} -eq 0 ] || "$MDIR/venv/bin/mutmut" run --max-children "${EQDIFF_MUTATION_JOBS:-2}" "${PATTERNS[@]}" || true
fi
"$MPY" "$REPO/scripts/mutation_report.py" "${REPORT_ARGS[@]}"
