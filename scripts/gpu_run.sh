#!/usr/bin/env bash
# On the lent GPU machine, over the tree scripts/gpu_prepare.sh carried in .gpu/:
#   bash scripts/gpu_run.sh tests   the cuda-marked tests and the in-process trainer/inference tests on CUDA
#   bash scripts/gpu_run.sh bench   every benchmark, JSON into $OUT (or artifacts/gpu/)
# Each fits in one 10-minute call.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GPU=$REPO/.gpu
RESULTS=${OUT:-$REPO/artifacts/gpu}
mkdir -p "$RESULTS" /tmp/eqdiff-deps
python -m pip install -q --no-index --no-deps --target /tmp/eqdiff-deps "$GPU"/wheels/*.whl
export PYTHONPATH=/tmp/eqdiff-deps${PYTHONPATH:+:$PYTHONPATH} EQDIFF_ENV=$GPU/env HF_HUB_OFFLINE=1
COMFY=$GPU/env/ComfyUI
mkdir -p "$COMFY/custom_nodes" "$COMFY/models/checkpoints"
ln -sfn "$REPO" "$COMFY/custom_nodes/eqdiff-nodes"
[ -f "$COMFY/models/checkpoints/eqdiff_tiny_sd15.safetensors" ] || \
  python "$REPO/scripts/tiny_checkpoint.py" --comfy "$COMFY" --out "$COMFY/models/checkpoints/eqdiff_tiny_sd15.safetensors"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RESULTS/gpu.csv" || true
case "${1:-}" in
  tests)
    EQDIFF_GROUNDING_REAL_SHAPES=$GPU/grounding/real_shapes.json python -m pytest -c tests/pytest.ini --rootdir tests \
      -q -m cuda tests/unit tests/comfy/test_grounding.py 2>&1 | tee "$RESULTS/cuda_tests.txt"
    python -m pytest -c tests/pytest.ini --rootdir tests -q tests/comfy/test_training.py tests/comfy/test_inference.py \
      tests/comfy/test_ddim.py 2>&1 | tee "$RESULTS/comfy_tests_on_cuda.txt" ;;
  bench)
    python bench/fft_split.py > "$RESULTS/fft_split.json"
    python bench/train.py > "$RESULTS/train.json"
    python bench/sample.py > "$RESULTS/sample.json"
    python bench/grounded_mask.py > "$RESULTS/grounded_mask.json" ;;
  *) echo "usage: gpu_run.sh tests|bench" >&2; exit 2 ;;
esac
