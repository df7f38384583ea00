#!/usr/bin/env bash
# The test command: installs the ComfyUI host if needed (scripts/host.sh), then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k attention`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/scripts/host.sh"
cd "$repo"
exec "$EDIT_PYTHON" -m pytest "$@"
