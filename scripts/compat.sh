#!/usr/bin/env bash
# Compatibility run: the server, workflow, patcher-equivalence and stacking tests against the
# ComfyUI folder at PATH (any version, e.g. a git checkout of ComfyUI).
#
#   bash scripts/compat.sh PATH [pytest arguments, e.g. -k name]
#
# The tests run in a Python environment layered over the test host's (scripts/host.sh): a
# venv that sees every host package (torch included) and holds, in front of them, what PATH's
# requirements.txt asks for that the host lacks or has too old. torch and torchvision stay the
# host's. ComfyUI lists torchaudio, but no torchaudio release is built for the host's torch: if
# no matching one installs, the newest is installed without its torch pin and must import (only
# ComfyUI's audio models use it). The front-end, template and docs packages are left out: the
# tests run ComfyUI headless with an empty front end.
#
# The layered venv is kept under $EDIT_COMPAT_DIR (default .compat/), one per ComfyUI version and
# requirements, and reused. Exits non-zero if installing or any test fails.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ] || [ ! -f "$1/main.py" ] || [ ! -f "$1/comfy/model_management.py" ]; then
  echo "usage: bash scripts/compat.sh PATH [pytest arguments]: PATH must be a ComfyUI folder (main.py, comfy/)" >&2
  exit 2
fi
comfy=$(cd "$1" && pwd)
shift

# The host's Python, not a user's ComfyUI: that is what compat.sh layers over.
unset EDIT_COMFYUI_DIR EDIT_PYTHON
source "$repo/scripts/host.sh"
host_python=$EDIT_PYTHON
host_site=$("$host_python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
base_python=$("$host_python" -c "import sys; print(sys._base_executable)")

version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$comfy/comfyui_version.py" 2>/dev/null || true)
version=${version:-unknown}
reqs=$comfy/requirements.txt
[ -f "$reqs" ] || { echo "compat: $reqs not found: cannot tell what this ComfyUI needs" >&2; exit 2; }

# What to install: the essential part of requirements.txt (above "#non essential"), without
# torch/torchvision/torchaudio (handled below) and without the UI content packages.
want=$(sed -n '/^#non essential/q; p' "$reqs" | sed 's/#.*//; s/[[:space:]]//g' | grep -v '^$' |
  grep -viE '^(torch|torchvision|torchaudio|comfyui-frontend-package|comfyui-workflow-templates|comfyui-embedded-docs)([^a-z0-9_.-]|$)' || true)
needs_torchaudio=$(grep -qiE '^torchaudio([^a-z0-9_.-]|$)' "$reqs" && echo 1 || echo 0)

compat_dir=${EDIT_COMPAT_DIR:-$repo/.compat}
key=$(printf '%s\n%s\n%s\n' "$want" "$needs_torchaudio" "$(cat "$host/stamp" 2>/dev/null || "$host_python" -m pip freeze)" |
  sha256sum | cut -c1-12)
venv=$compat_dir/comfyui-$version-$key
py=$venv/bin/python

if [ ! -f "$venv/ready" ]; then
  echo "compat: making $venv (ComfyUI $version's requirements over the host's packages)"
  rm -rf "$venv"
  mkdir -p "$compat_dir"
  "$base_python" -m venv "$venv"
  venv_site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$host_site" > "$venv_site/_edit_host_packages.pth"
  pins=$venv/host-torch.txt
  "$host_python" -m pip freeze --disable-pip-version-check | grep -iE '^(torch|torchvision)==' > "$pins"
  pip=("$py" -m pip install -q --disable-pip-version-check -c "$pins")
  if [ -n "$want" ]; then
    printf '%s\n' "$want" > "$venv/requirements.txt"
    "${pip[@]}" -r "$venv/requirements.txt"
  fi
  if [ "$needs_torchaudio" = 1 ] && ! "$py" -c "import torchaudio" 2>/dev/null; then
    if ! "${pip[@]}" torchaudio 2>/dev/null; then
      echo "compat: no torchaudio release matches the host's $(grep -i '^torch==' "$pins"); installing the newest without its torch pin"
      "$py" -m pip install -q --disable-pip-version-check --no-deps torchaudio
    fi
    "$py" -c "import torch, torchaudio.functional; print('compat: torch', torch.__version__, 'with torchaudio', torchaudio.__version__)"
  fi
  touch "$venv/ready"
fi
echo "compat: extra packages for ComfyUI $version: $("$py" -m pip list --disable-pip-version-check --path "$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")" --format=freeze 2>/dev/null | grep -viE '^(pip|setuptools)==' | tr '\n' ' ')"

cd "$repo"
EDIT_COMFYUI_DIR=$comfy EDIT_PYTHON=$py bash scripts/test.sh -q \
  tests/server/test_server.py tests/server/test_server_compat.py tests/client/test_workflows.py tests/comfyui/test_patcher.py tests/comfyui/test_stacking.py "$@"
