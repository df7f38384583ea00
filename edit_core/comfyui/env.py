"""Use ComfyUI as a library outside its server (command-line tools, tests)."""
import os
import sys
from pathlib import Path


def setup_comfy(comfyui_dir=None):
    """Make ``comfy`` importable and pick its device the way ``main.py --cpu`` would on a
    machine without CUDA. ComfyUI is found at ``comfyui_dir``, $EDIT_COMFYUI_DIR, or the
    ComfyUI checkout this pack sits in (custom_nodes/ComfyUI-EDiT)."""
    if "comfy" not in sys.modules:
        pack = Path(__file__).resolve().parents[2]
        candidates = [comfyui_dir, os.environ.get("EDIT_COMFYUI_DIR"), pack.parent.parent, pack / ".host" / "ComfyUI"]
        for c in candidates:
            if c and (Path(c) / "comfy" / "model_management.py").is_file():
                if str(c) not in sys.path:
                    sys.path.insert(0, str(c))  # before this pack, whose nodes/ would shadow ComfyUI's nodes.py
                break
        else:
            raise RuntimeError("ComfyUI not found: set EDIT_COMFYUI_DIR to your ComfyUI folder "
                               "(or run `bash scripts/host.sh` to install the test host)")
    import torch
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
