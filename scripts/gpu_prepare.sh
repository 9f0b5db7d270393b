#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored, under the 64 MiB a device call may carry) so that ONE call on the lent
# GPU machine runs the CUDA tests and every benchmark: ComfyUI's code without models and without the
# tokenizers of other model families, the Python 3.12 wheels that machine lacks (environment.md §9),
# and the real-size grounding key shapes. Run here (CPU), after scripts/setup_env.sh; then carry
# [".gpu"] and run `bash scripts/gpu_run.sh tests` and `bash scripts/gpu_run.sh bench` there.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENV_DIR=${EQDIFF_ENV:-$REPO/.comfy}
OUT=$REPO/.gpu
rm -rf "$OUT"
mkdir -p "$OUT/env/ComfyUI" "$OUT/wheels"
(cd "$ENV_DIR/ComfyUI" && tar -c --exclude=./models --exclude=./custom_nodes --exclude=./input --exclude=./output \
  --exclude=./temp --exclude=./tests --exclude=./tests-unit --exclude='./comfy/text_encoders/*/*' --exclude='__pycache__' .) \
  | tar -x -C "$OUT/env/ComfyUI"
"$ENV_DIR/venv/bin/python" -m pip download -q --no-cache-dir --only-binary=:all: --python-version 3.12 --no-deps -d "$OUT/wheels" \
  torchsde==0.2.6 trampoline==0.1.2 av pydantic pydantic-core annotated-types typing-inspection \
  pytest==8.4.2 pluggy iniconfig pytest-timeout
FACTORY_OUT=$(mktemp -d)
"$ENV_DIR/venv/bin/python" "$REPO/tests/grounding_factory.py" "$FACTORY_OUT" --real-shapes --no-small >/dev/null 2>&1
mkdir -p "$OUT/grounding"
cp "$FACTORY_OUT/real_shapes.json" "$OUT/grounding/"
rm -rf "$FACTORY_OUT"
du -sh "$OUT"
