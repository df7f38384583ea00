#!/usr/bin/env bash
# The main job: the example SD3.5 workflow through a real ComfyUI server, EDiT on and off,
# timed. Built-in tiny models unless EDIT_MODELS_DIR points at your ComfyUI models folder.
# Options go to `python -m edit_core.client.example` (see --help).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$repo/scripts/host.sh"
cd "$repo"
exec "$EDIT_PYTHON" -m edit_core.client.example "$@"
