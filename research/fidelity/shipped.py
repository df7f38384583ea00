"""The trained artifacts the study ships in ``research/fidelity/shipped/``: the two emoji
teachers and the feature classifier, so that tests and studies start from them instead of
retraining. ``manifest.json`` records each one's file, the sha256 of its weights and the
command that reproduces it; a shipped file whose weights differ from the record is refused."""
import hashlib
import json
from pathlib import Path
from typing import Dict, Optional

import torch

FOLDER = Path(__file__).resolve().parent / "shipped"
MANIFEST = FOLDER / "manifest.json"


def weights_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors (names, dtypes, shapes, bytes; not a file's metadata, which holds
    wall times): equal for two runs that trained the same weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def entries() -> Dict[str, Dict]:
    return json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}


def shipped_file(key: str, name: str) -> Optional[Path]:
    """The shipped file ``name`` when the manifest records it under ``key``, else None."""
    entry = entries().get(key, {})
    return FOLDER / name if entry.get("file") == name and (FOLDER / name).is_file() else None


def check_digest(path: Path, tensors: Dict[str, torch.Tensor], key: str) -> str:
    """``tensors`` (read from ``path``) against the manifest's record for ``key``; their digest."""
    digest, expected = weights_digest(tensors), entries()[key]["weights_sha256"]
    if digest != expected:
        raise ValueError(f"{path}: weights sha256 {digest[:16]}... is not the {expected[:16]}... that "
                         f"{MANIFEST.name} records for it; the file was changed or damaged: restore it (git checkout) "
                         f"or reproduce it with `{entries()[key]['command']}`")
    return digest


def record(key: str, entry: Dict):
    """Set the manifest's entry for ``key``."""
    all_entries = entries()
    all_entries[key] = entry
    FOLDER.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(json.dumps(all_entries, indent=1, sort_keys=True) + "\n")
