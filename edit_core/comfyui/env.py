"""Where ComfyUI is, and ComfyUI used as a library outside its server (command-line tools,
tests). Importing this module loads neither torch nor ComfyUI: the HTTP client uses
``find_comfyui`` to start a server."""
import os
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parents[2]


def find_comfyui(comfyui_dir=None) -> Path:
    """ComfyUI's folder: ``comfyui_dir``, $EDIT_COMFYUI_DIR, the ComfyUI checkout this pack
    sits in (custom_nodes/<pack>), or the test host under .host/ComfyUI; the first that holds
    both comfy/model_management.py and main.py."""
    for c in (comfyui_dir, os.environ.get("EDIT_COMFYUI_DIR"), PACK.parent.parent, PACK / ".host" / "ComfyUI"):
        if c and (Path(c) / "comfy" / "model_management.py").is_file() and (Path(c) / "main.py").is_file():
            return Path(c).resolve()
    raise RuntimeError("ComfyUI not found: set EDIT_COMFYUI_DIR to your ComfyUI folder "
                       "(or run `bash scripts/host.sh` to install the test host)")


def add_comfyui_flag(parser):
    """The ``--comfyui`` flag every command-line tool takes; pass its value to ``setup_comfy``
    before importing anything that imports ``comfy``."""
    parser.add_argument("--comfyui", help="ComfyUI folder (default: $EDIT_COMFYUI_DIR, the ComfyUI this pack is "
                                          "in, or the test host)")


def setup_comfy(comfyui_dir=None):
    """Make ``comfy`` importable (ComfyUI found by ``find_comfyui``) and pick its device the
    way ``main.py --cpu`` would on a machine without CUDA."""
    if "comfy" not in sys.modules:
        folder = str(find_comfyui(comfyui_dir))
        if folder not in sys.path:
            sys.path.insert(0, folder)  # before this pack, whose nodes/ would shadow ComfyUI's nodes.py
    import torch
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
