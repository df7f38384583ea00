"""The real captioned image set the fidelity study trains its teachers on: Twemoji's drawn
emoji, 64 x 64 RGBA, as the npm package ``emoji-datasource-twitter`` ships them, with each
emoji's name, category and subcategory from the package's ``emoji.json`` as its caption.

The package is pinned by version and by the registry's sha512 integrity; the install step
(scripts/host.sh) fetches it once (``python -m research.fidelity.emoji fetch DIR``). Reading
trusts nothing but that hash: only the catalogue and the 64 px PNGs named in it are read, each
checked for size and mode. Graphics: Twemoji, CC-BY 4.0 (Twitter, Inc. and contributors);
catalogue: MIT (emoji-data, Cal Henderson).

Images are kept premultiplied by alpha (transparent pixels are 0 in every channel), as uint8.
One emoji in ten, chosen by a hash of its name, is held out: its caption never trains a
teacher or a student.
"""
import argparse
import base64
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from PIL import Image  # ComfyUI's own dependency

from edit_core.util.safetensors_io import atomic_write

PACKAGE = "emoji-datasource-twitter"
VERSION = "16.0.0"
INTEGRITY = "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ=="
TARBALL = f"{PACKAGE}-{VERSION}.tgz"
URL = f"https://registry.npmjs.org/{PACKAGE}/-/{TARBALL}"
SIZE = 64
MAX_CATALOGUE_BYTES = 16 * 2**20
MAX_PNG_BYTES = 256 * 2**10
IMAGE_NAME = re.compile(r"[0-9a-f]{2,8}(-[0-9a-f]{2,8}){0,9}\.png")
DATA_ENV = "EDIT_DATA_DIR"


class DatasetError(RuntimeError):
    pass


def integrity_of(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fetch(dest: Path) -> Path:
    """Download the pinned tarball into ``dest`` (once) and check its integrity."""
    dest = Path(dest)
    path = dest / TARBALL
    if path.is_file() and integrity_of(path.read_bytes()) == INTEGRITY:
        return path
    dest.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(URL, timeout=120) as response:
        data = response.read()
    found = integrity_of(data)
    if found != INTEGRITY:
        raise DatasetError(f"{URL}: integrity {found[:30]}... does not match the pinned {INTEGRITY[:30]}...")
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def tarball_path(data_dir: Optional[Path] = None) -> Path:
    """The fetched tarball: in ``data_dir``, $EDIT_DATA_DIR, or the test host's data folder."""
    candidates = [data_dir, os.environ.get(DATA_ENV), Path(__file__).resolve().parents[2] / ".host" / "data"]
    for c in candidates:
        if c and (Path(c) / TARBALL).is_file():
            return Path(c) / TARBALL
    raise DatasetError(f"{TARBALL} not found (looked in {', '.join(str(c) for c in candidates if c)}); fetch it "
                       f"with `python -m research.fidelity.emoji fetch DIR` (bash scripts/host.sh does)")


@dataclass
class EmojiSet:
    images: torch.Tensor        # (N, 4, 64, 64) uint8, RGBA premultiplied by alpha
    captions: List[str]
    categories: List[str]
    held_out: torch.Tensor      # (N,) bool
    source: str                 # package@version and integrity

    def split(self, held_out: bool) -> "EmojiSet":
        idx = torch.nonzero(self.held_out == held_out).flatten()
        return EmojiSet(self.images[idx], [self.captions[i] for i in idx], [self.categories[i] for i in idx],
                        self.held_out[idx], self.source)

    def __len__(self):
        return len(self.captions)


def caption_of(entry: dict) -> str:
    """'grinning face, face smiling, smileys emotion': name, subcategory and category, in words."""
    parts = (entry["name"], entry.get("subcategory") or "", entry.get("category") or "")
    return ", ".join(" ".join(re.findall(r"[a-z0-9]+", p.lower())) for p in parts if p)


def is_held_out(name: str) -> bool:
    return zlib.crc32(name.encode()) % 10 == 0


def load(tarball: Optional[Path] = None) -> EmojiSet:
    """Every base emoji (no skin-tone variants) that has a Twemoji image, in catalogue order."""
    path = Path(tarball) if tarball else tarball_path()
    data = path.read_bytes()
    if integrity_of(data) != INTEGRITY:
        raise DatasetError(f"{path}: not the pinned {PACKAGE}@{VERSION} (integrity differs); delete it and fetch again")
    files = {}  # one pass over the gzip stream: random access into it re-reads from the start
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar:
            wanted = m.name == "package/emoji.json" or m.name.startswith("package/img/twitter/64/")
            if m.isfile() and wanted:
                limit = MAX_CATALOGUE_BYTES if m.name.endswith(".json") else MAX_PNG_BYTES
                files[m.name] = tar.extractfile(m).read(limit + 1)

    def read(name: str, limit: int) -> bytes:
        if name not in files or len(files[name]) > limit:
            raise DatasetError(f"{path}: {name} is missing or larger than {limit} bytes")
        return files[name]

    catalogue = json.loads(read("package/emoji.json", MAX_CATALOGUE_BYTES))
    images, captions, categories, held = [], [], [], []
    for entry in sorted(catalogue, key=lambda e: e.get("sort_order", 0)):
        image = entry.get("image", "")
        if not entry.get("has_img_twitter") or not IMAGE_NAME.fullmatch(image):
            continue
        png = Image.open(io.BytesIO(read(f"package/img/twitter/64/{image}", MAX_PNG_BYTES)))
        if png.size != (SIZE, SIZE):
            raise DatasetError(f"{path}: {image} is {png.size}, expected {SIZE}x{SIZE}")
        rgba = torch.frombuffer(bytearray(png.convert("RGBA").tobytes()), dtype=torch.uint8)
        rgba = rgba.view(SIZE, SIZE, 4).permute(2, 0, 1).float()
        rgba[:3] *= rgba[3:] / 255  # premultiplied: a transparent pixel is 0 in every channel
        images.append(rgba.round().to(torch.uint8))
        captions.append(caption_of(entry))
        categories.append(entry["category"])
        held.append(is_held_out(entry["name"]))
    return EmojiSet(torch.stack(images), captions, categories, torch.tensor(held), f"{PACKAGE}@{VERSION} {INTEGRITY}")


def to_unit(images: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """uint8 RGBA (N, 4, 64, 64) -> float in [-1, 1] at ``size`` px (area average, premultiplied)."""
    x = images.float() / 127.5 - 1
    return x if size == x.shape[-1] else F.interpolate(x, size=(size, size), mode="area")


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] premultiplied RGBA -> RGB in [0, 1] over white, for viewing."""
    x = ((x.float() + 1) / 2).clamp(0, 1)
    return x[:, :3] + (1 - x[:, 3:4])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.fidelity.emoji", allow_abbrev=False,
                                description=f"Fetch or check the pinned {PACKAGE}@{VERSION}.")
    p.add_argument("command", choices=("fetch", "check"))
    p.add_argument("dir", help="folder that holds (or receives) the tarball")
    args = p.parse_args(argv)
    if args.command == "fetch":
        print(f"data: {fetch(Path(args.dir))}")
    else:
        s = load(Path(args.dir) / TARBALL)
        print(f"data: {len(s)} emoji, {int(s.held_out.sum())} held out, from {s.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
