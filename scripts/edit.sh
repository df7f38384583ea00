#!/usr/bin/env bash
# The pack's command-line tools, run with the test host's Python (installed once by
# scripts/host.sh), from any folder:
#   bash scripts/edit.sh batch workflows/api/sd35_medium_edit.json --tiny ...
#   bash scripts/edit.sh distill --help
# TOOL is a name from scripts/tools.txt, which says which module it runs; the rest goes to
# `python -m MODULE`. With EDIT_COMFYUI_DIR and EDIT_PYTHON set, your own ComfyUI and Python
# are used instead.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools=$(grep -v '^#' "$repo/scripts/tools.txt" | awk '{print $1}' | paste -sd, - | sed 's/,/, /g')
usage="usage: bash scripts/edit.sh TOOL [options]   (TOOL: $tools; TOOL --help lists its options)"
if [ $# -eq 0 ]; then
  echo "$usage" >&2
  exit 2
elif [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  echo "$usage"
  exit 0
fi
name=$1
shift
module=$(awk -v name="$name" '$1 == name && !/^#/ {print $2}' "$repo/scripts/tools.txt")
if [ -z "$module" ]; then
  echo "error: no tool '$name' in this pack: use one of $tools" >&2
  exit 2
fi
source "$repo/scripts/host.sh" >&2
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
exec "$EDIT_PYTHON" -m "$module" "$@"
