"""Writing files whole and reading safetensors headers safely: the pack's one atomic writer
and one header reader.

safetensors maps a file into memory and trusts its header's offsets: a truncated file whose
header survived would be read past its end (the process dies with SIGBUS). ``read_header``
checks the header against the file's size first, without reading any tensor.
"""
import json
import os
import secrets
import struct
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from safetensors.torch import save_file

MAX_HEADER = 64 * 2**20


class HeaderError(ValueError):
    """A file that is not a whole safetensors file; the message says what is wrong with it."""


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary name beside ``path``, flush it to disk, then
    rename it over ``path``: readers see the old file or the new one, never a part. The
    temporary name is unique, so two writers of one path cannot collide; it is removed when
    ``write`` fails. ``write`` creates the file, so it gets the usual permissions (umask)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_safetensors(tensors: Dict[str, torch.Tensor], path, metadata: Optional[Dict[str, str]] = None) -> Path:
    """``tensors`` (moved to the CPU, made contiguous) as a safetensors file, written atomically."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata))


def read_header(path, max_bytes: int = MAX_HEADER) -> Dict:
    """The safetensors header of ``path`` (tensor entries and ``__metadata__``), after checking
    that the file holds exactly the bytes it describes; HeaderError says what is wrong."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HeaderError(f"it has {size} bytes, too few for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(max_bytes, size - 8):
                raise HeaderError(f"its header claims {n} bytes, the file has {size}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, HeaderError):
            raise
        raise HeaderError(f"it does not read as safetensors ({type(e).__name__}: {e})") from e
    if not isinstance(header, dict):
        raise HeaderError("its header is not a table of tensors")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise HeaderError("its header has malformed tensor entries") from None
    if 8 + n + end != size:
        raise HeaderError(f"it is truncated or padded: its header describes {8 + n + end} bytes, the file has {size}")
    return header


def complete(path) -> Optional[str]:
    """None if ``path`` is a whole safetensors file; else what is wrong with it."""
    try:
        read_header(path)
    except HeaderError as e:
        return str(e)
    return None
