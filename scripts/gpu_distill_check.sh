#!/usr/bin/env bash
# One full-size distillation training step per mode (layer-wise, end-to-end) at 1024 px on
# CUDA, bf16, random weights, for SD3.5-Medium and PixArt-Sigma, beside the plan's
# fake-tensor figures: CUDA allocator peak, the counter on real tensors, step time.
# Writes $OUT/stepcheck.json and $OUT/stepcheck.md ($OUT defaults to ./gpu_distill_check).
# Nothing is downloaded: it needs the ComfyUI host already there ($EDIT_PYTHON and
# $EDIT_COMFYUI_DIR, or .host/ from scripts/host.sh). Capped at 7.5 minutes; not run on a GPU yet.
#
#   bash scripts/gpu_distill_check.sh              # on a GPU machine
#   bash scripts/gpu_distill_check.sh --cpu-smoke  # the same code on a CPU: 2-block real-width models, 384 px
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
out=${OUT:-$repo/gpu_distill_check}
python=${EDIT_PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$repo/.host/venv/bin/python" ]; then python=$repo/.host/venv/bin/python; else python=python3; fi
fi
if [ "${1:-}" = "--cpu-smoke" ]; then
  export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-131072}  # freed blocks go back to the OS: RSS follows the tensors
  args=(--models sd35-medium-2blocks pixart-sigma-2blocks --resolution 384 --device cpu --repeats 1)
elif [ -z "${1:-}" ]; then
  "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --cpu-smoke')"
  args=(--models sd35-medium pixart-sigma --resolution 1024 --device cuda --repeats 2)
else
  echo "usage: bash scripts/gpu_distill_check.sh [--cpu-smoke]" >&2
  exit 2
fi
exec timeout 450 "$python" -m research.distill_checks.stepcheck "${args[@]}" --out "$out"
