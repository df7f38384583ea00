#!/usr/bin/env bash
# The pack's command-line tools, run with the test host's Python (installed once by
# scripts/host.sh), from any folder:
#   bash scripts/edit.sh batch workflows/api/sd35_medium_edit.json --tiny ...
#   bash scripts/edit.sh distill --help
# TOOL is a module under edit_core (bench, bench.profile, distill, distill.benchmark, fidelity, batch,
# example) or `plan` (edit_core.distill.plan); the rest goes to `python -m edit_core.TOOL`.
# With EDIT_COMFYUI_DIR and EDIT_PYTHON set, your own ComfyUI and Python are used instead.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="bench, bench.profile, distill, distill.benchmark, fidelity, plan, batch, example"
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
tool=$name
[ "$tool" = plan ] && tool=distill.plan
path=$repo/edit_core/${tool//.//}
if [[ ! "$tool" =~ ^[a-z_.]+$ ]] || { [ ! -f "$path.py" ] && [ ! -f "$path/__main__.py" ]; }; then
  echo "error: no tool '$name' in this pack: use one of $tools" >&2
  exit 2
fi
source "$repo/scripts/host.sh" >&2
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
exec "$EDIT_PYTHON" -m "edit_core.$tool" "$@"
