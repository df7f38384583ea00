#!/usr/bin/env bash
# The GPU check: SDPA vs EDiT vs the Amdahl bound in full-depth SD3.5-Medium and
# PixArt-Sigma (ComfyUI's classes, random weights, bf16) at 1024/2048/4096 px, eager and under
# ComfyUI's torch.compile path, plus the block level; see research/bench/gpu_check.py.
# Writes results.md, results.json and PNG plots under $OUT (default: results/gpu_check, git-ignored).
# Downloads nothing itself, but needs the host Python: scripts/host.sh builds .host/ from PyPI on
# first use (or point EDIT_COMFYUI_DIR and EDIT_PYTHON at an existing ComfyUI and its Python).
# Measuring stops starting new points after --time-limit s (default 400); the whole run is cut at 8 min.
#   bash scripts/gpu_check.sh               # on the GPU machine
#   bash scripts/gpu_check.sh --cpu-smoke   # tiny, on the CPU: tests the script
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
source "$repo/scripts/host.sh"
cd "$repo"
exec timeout 480 "$EDIT_PYTHON" -m research.bench.gpu_check --out "${OUT:-$repo/results/gpu_check}" "$@"
