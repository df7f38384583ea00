"""Reading back the safetensors files distillation writes, safely.

safetensors maps a file into memory and trusts its header's offsets: a truncated file whose
header survived would be read past its end (the process dies with SIGBUS). ``complete``
checks the header against the file's size first, without reading any tensor.
"""
import json
import struct
from pathlib import Path
from typing import Optional

MAX_HEADER = 64 * 2**20


def complete(path: Path) -> Optional[str]:
    """None if ``path`` is a whole safetensors file; else what is wrong with it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"it has {size} bytes, too few for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                return f"its header claims {n} bytes, the file has {size}"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"it does not read as safetensors ({type(e).__name__}: {e})"
    if not isinstance(header, dict):
        return "its header is not a table of tensors"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "its header has malformed tensor entries"
    if 8 + n + end != size:
        return f"it is truncated or padded: its header describes {8 + n + end} bytes, the file has {size}"
    return None
