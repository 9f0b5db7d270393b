# An environment for another ComfyUI tree, for running the suite against it. Sourced (not run) by
# scripts/setup_env.sh and scripts/test.sh when EQDIFF_COMFY names a ComfyUI folder:
#
#   EQDIFF_COMFY=/path/to/ComfyUI [EQDIFF_PYTHON=/path/to/python3.X] [EQDIFF_FRONTEND=1.58.1] \
#     [EQDIFF_TORCH="torch==A torchvision==B torchaudio==C"] bash scripts/test.sh [pytest args]
#
# The environment is .comfy-envs/<ComfyUI version>-py<X.Y>[-fe<frontend>]/ (git-ignored; EQDIFF_ENV
# overrides it):
#   venv/     a venv made with EQDIFF_PYTHON (default: python3) holding the tree's own requirements.txt,
#             a consistent torch / torchvision / torchaudio triple from the package registry (the tree
#             leaves them unpinned), the test tools and the grounding reference libraries of
#             setup_env.sh; installed with uv, which hard-links packages from its cache, so several
#             environments share one copy of torch and the CUDA libraries
#   tf5/      the transformers 5.x overlay, as in .comfy/tf5
#   ComfyUI   a symbolic link to the tree
#   base/     ComfyUI's --base-directory for the tests: models/ (the tiny checkpoint, GroundingDINO, SAM)
#             and custom_nodes/eqdiff-nodes (a link to this repository)
# Nothing is written into the tree itself: servers run with --base-directory base/ (and their own
# input/output/temp/user folders), in-process tests set the same base directory before ComfyUI's
# folder_paths is imported, and PYTHONDONTWRITEBYTECODE=1 keeps __pycache__ out of it.

TREE_SRC=$(cd "$EQDIFF_COMFY" && pwd -P)
if [ ! -f "$TREE_SRC/main.py" ] || [ ! -f "$TREE_SRC/requirements.txt" ] || [ ! -f "$TREE_SRC/comfyui_version.py" ]; then
  echo "EQDIFF_COMFY=$EQDIFF_COMFY is not a ComfyUI folder (main.py, requirements.txt, comfyui_version.py)" >&2
  exit 2
fi
TREE_PY=${EQDIFF_PYTHON:-${PYTHON:-python3}}
TREE_VERSION=$(sed -n -E 's/^__version__ = "([^"]+)".*/\1/p' "$TREE_SRC/comfyui_version.py")
TREE_PY_XY=$("$TREE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# torchaudio 2.11.0 is the newest torchaudio on the registry that pins a torch (2.11.1 accepts any, and
# a mismatched one fails to load); torchvision 0.26.0 is the one built for torch 2.11.0.
TREE_TORCH=${EQDIFF_TORCH:-"torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"}
TREE_FRONTEND=${EQDIFF_FRONTEND:-}
export EQDIFF_ENV=${EQDIFF_ENV:-$REPO/.comfy-envs/$TREE_VERSION-py$TREE_PY_XY${TREE_FRONTEND:+-fe$TREE_FRONTEND}}
export PYTHONDONTWRITEBYTECODE=1

# Builds (or re-checks) $EQDIFF_ENV; uses TEST_TOOLS, GROUNDING_REF, TF5_PKGS and WITH_BROWSER of
# setup_env.sh.
tree_env_build() {
  local env_dir=$EQDIFF_ENV
  local vpy=$env_dir/venv/bin/python base=$env_dir/base uv
  mkdir -p "$env_dir"
  uv=$(command -v uv || true)
  if [ -z "$uv" ]; then
    uv=$REPO/.comfy-envs/.uv/bin/uv
    if [ ! -x "$uv" ]; then
      echo "[setup] installing uv into $REPO/.comfy-envs/.uv"
      "$TREE_PY" -m venv "$REPO/.comfy-envs/.uv"
      "$REPO/.comfy-envs/.uv/bin/python" -m pip install -q uv
    fi
  fi
  export UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=${UV_LINK_MODE:-hardlink}
  local cons=$env_dir/constraints.txt
  {
    for p in $TREE_TORCH; do echo "$p"; done
    echo "transformers==4.57.6"   # as in setup_env.sh: the suite's first run is under transformers 4.x
    echo "huggingface-hub<1.0"
    [ -z "$TREE_FRONTEND" ] || echo "comfyui-frontend-package==$TREE_FRONTEND"
  } > "$cons"
  local stamp=$env_dir/.setup-stamp want
  want=$( { cat "$REPO/scripts/tree_env.sh" "$cons" "$TREE_SRC/requirements.txt"
            echo "$TREE_SRC|$("$TREE_PY" -c 'import sys; print(sys.version)')|$TEST_TOOLS|$GROUNDING_REF|$TF5_PKGS"
            uname -m; } | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x "$vpy" ]; then
    echo "[setup] building $env_dir for ComfyUI $TREE_VERSION ($TREE_SRC) on Python $TREE_PY_XY"
    [ -x "$vpy" ] || "$uv" venv -q --python "$TREE_PY" "$env_dir/venv"
    local uvi=("$uv" pip install -q --python "$vpy")
    "${uvi[@]}" $TREE_TORCH -c "$cons"
    # The tree's own requirements, with the torch triple and the frontend taken from the constraints.
    grep -v -E '^(torch|torchvision|torchaudio)([^a-zA-Z_-]|$)' "$TREE_SRC/requirements.txt" \
      | { if [ -n "$TREE_FRONTEND" ]; then grep -v -E '^comfyui-frontend-package'; echo "comfyui-frontend-package"; else cat; fi; } \
      > "$env_dir/req-comfy.txt"
    "${uvi[@]}" -r "$env_dir/req-comfy.txt" requests -c "$cons"
    "${uvi[@]}" $TEST_TOOLS -c "$cons"
    "${uvi[@]}" $GROUNDING_REF -c "$cons"
    "${uvi[@]}" --no-deps groundingdino-py==0.4.0
    rm -rf "$env_dir/tf5"
    "$uv" pip install -q --no-deps --target "$env_dir/tf5" --python "$vpy" $TF5_PKGS
    echo "$want" > "$stamp"
  fi
  ln -sfn "$TREE_SRC" "$env_dir/ComfyUI"
  mkdir -p "$base/custom_nodes" "$base/models/checkpoints"
  if [ "$(readlink "$base/custom_nodes/eqdiff-nodes" 2>/dev/null)" != "$REPO" ]; then
    rm -rf "$base/custom_nodes/eqdiff-nodes"
    ln -s "$REPO" "$base/custom_nodes/eqdiff-nodes"
  fi
  if [ "$WITH_BROWSER" = 1 ] && [ ! -x /usr/bin/chromium ]; then
    echo "[setup] installing Debian's chromium"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium >/dev/null
  fi
  "$vpy" "$REPO/scripts/tiny_checkpoint.py" --comfy "$TREE_SRC" \
    --out "$base/models/checkpoints/eqdiff_tiny_sd15.safetensors" >/dev/null
  local gd=$base/models/grounding-dino
  if [ ! -f "$gd/eqdiff_tiny_swint.safetensors" ] || [ ! -f "$base/models/sams/eqdiff_tiny_vit.safetensors" ] \
     || [ ! -f "$gd/bert-base-uncased/config.json" ]; then
    local tiny
    tiny=$(mktemp -d)
    "$vpy" "$REPO/tests/grounding_factory.py" "$tiny" >/dev/null 2>&1
    mkdir -p "$gd" "$base/models/sams"
    cp "$tiny/grounding-dino/tiny_swint.safetensors" "$gd/eqdiff_tiny_swint.safetensors"
    cp "$tiny/sams/tiny_vit.safetensors" "$base/models/sams/eqdiff_tiny_vit.safetensors"
    rm -rf "$gd/bert-base-uncased"
    cp -r "$tiny/bert" "$gd/bert-base-uncased"
    rm -rf "$tiny"
  fi
  echo "[setup] ready: python $vpy, ComfyUI $TREE_VERSION at $TREE_SRC, environment $env_dir"
}
