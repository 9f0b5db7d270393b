#!/usr/bin/env bash
# Sets everything up (idempotent, including Debian's Chromium) and runs all tests:
# tests/unit, tests/comfy, tests/e2e (server + browser). Extra arguments go to pytest.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$REPO/scripts/setup_env.sh" --browser
cd "$REPO"
[ $# -gt 0 ] || set -- tests
exec "${EQDIFF_ENV:-$REPO/.comfy}/venv/bin/python" -m pytest -c tests/pytest.ini --rootdir tests "$@"
