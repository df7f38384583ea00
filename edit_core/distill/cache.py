"""Teacher data on disk: what regenerating the teacher's features needs, not the features.

Per image (one safetensors shard per resolution x prompt x seed):
    latent   the teacher's final latent (C, h, w), float32, as KSampler returns it
    sigmas   the sigma of every model call the sampler made (the schedule the teacher saw)
Per prompt, once (``cond_p{index}``), and once for the negative prompt (``cond_negative``):
    the conditioning rows the model received (c_crossattn, y, ...), as the sampler built them.

Training examples re-noise the final latent at a sigma of the schedule with fresh noise and
run the teacher online (see examples.py, losses.py): nothing per layer is stored. At 1024 px
an SD3.5 image is 1 MiB (16 x 128 x 128 float32), a PixArt image 0.25 MiB.

Every file is written to a temporary name, flushed to disk and renamed, so a file under its
final name is complete. A file that does not read back (truncated, foreign) is regenerated:
it is derived data, and the teacher reproduces it exactly.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import complete

FORMAT = "comfyui-edit-teacher-data"
SHARD_HEADER_BYTES = 512  # safetensors header + metadata of one image shard (measured: ~300)


@dataclass(frozen=True)
class Job:
    resolution: Tuple[int, int]
    prompt: int
    seed: int

    @property
    def name(self) -> str:
        return f"image_{self.resolution[0]}x{self.resolution[1]}_p{self.prompt:04d}_s{self.seed}"


def image_bytes(latent_channels: int, resolution: Tuple[int, int], sample_steps: int) -> int:
    """Bytes on disk of one image shard: the float32 latent, the call sigmas, the header.
    The sampler makes at most 2 model calls per step for the samplers ComfyUI ships with a
    second-order update (heun, dpm_2: ``2 * steps - 1``)."""
    w, h = resolution
    return 4 * latent_channels * (h // 8) * (w // 8) + 4 * 2 * sample_steps + SHARD_HEADER_BYTES


def teacher_data_bytes(latent_channels: int, resolutions: Sequence[Tuple[int, int]], n_prompts: int, n_seeds: int,
                       cond_bytes_per_prompt: int, config) -> int:
    """Bytes on disk the run's teacher data takes: one shard per image plus the conditioning
    of every prompt and of the negative prompt (``cond_bytes_per_prompt`` each)."""
    images = sum(image_bytes(latent_channels, tuple(r), config.sample_steps) for r in resolutions) * n_prompts * n_seeds
    return images + (n_prompts + 1) * (cond_bytes_per_prompt + SHARD_HEADER_BYTES)


def cond_bytes(conds: Dict[str, torch.Tensor]) -> int:
    """Bytes on disk of one prompt's conditioning rows."""
    return sum(v.numel() * v.element_size() for v in conds.values())


def _write(path: Path, tensors: Dict[str, torch.Tensor], meta: Dict[str, str]):
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), dict(meta, format=FORMAT))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read(path: Path, load: bool = True) -> Optional[Dict[str, torch.Tensor]]:
    """The file's tensors (load=False: only checks the header, which safetensors validates
    against the file's size), or None when it is missing, truncated or not ours."""
    if not path.is_file() or complete(path) is not None:
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") != FORMAT or not f.keys():
                return None
            return {k: f.get_tensor(k).clone() if load else None for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


class TeacherData:
    """One folder of teacher data (its name is the teacher's fingerprint)."""

    def __init__(self, directory):
        self.dir = Path(directory)

    def image_path(self, job: Job) -> Path:
        return self.dir / f"{job.name}.safetensors"

    def cond_path(self, prompt: Optional[int]) -> Path:
        return self.dir / ("cond_negative.safetensors" if prompt is None else f"cond_p{prompt:04d}.safetensors")

    def image(self, job: Job) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(final latent (C, h, w), call sigmas (n,)) or None when missing or unreadable."""
        read = _read(self.image_path(job))
        if read is None or set(read) != {"latent", "sigmas"} or read["latent"].ndim != 3:
            return None
        return read["latent"], read["sigmas"]

    def conds(self, prompt: Optional[int]) -> Optional[Dict[str, torch.Tensor]]:
        """A prompt's (None: the negative prompt's) conditioning rows, or None."""
        return _read(self.cond_path(prompt))

    def has(self, job: Job, needs_negative: bool) -> bool:
        """Whether the job's image and its prompt's conditioning are on disk and read back
        (headers only); anything else is (re)generated."""
        image = _read(self.image_path(job), load=False)
        return (image is not None and set(image) == {"latent", "sigmas"}
                and _read(self.cond_path(job.prompt), load=False) is not None
                and (not needs_negative or _read(self.cond_path(None), load=False) is not None))

    def write(self, job: Job, latent: torch.Tensor, sigmas: torch.Tensor, cond: Dict[str, torch.Tensor],
              uncond: Optional[Dict[str, torch.Tensor]]):
        """Conditioning first, image last: the image's presence means the job is complete."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if _read(self.cond_path(job.prompt), load=False) is None:
            _write(self.cond_path(job.prompt), cond, {"prompt": str(job.prompt)})
        if uncond is not None and _read(self.cond_path(None), load=False) is None:
            _write(self.cond_path(None), uncond, {"prompt": "negative"})
        _write(self.image_path(job), {"latent": latent.float(), "sigmas": sigmas.float()},
               {"job": json.dumps({"resolution": list(job.resolution), "prompt": job.prompt, "seed": job.seed})})

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("*.safetensors")) if self.dir.is_dir() else 0


def image_jobs(resolutions, n_prompts: int, seeds) -> List[Job]:
    return [Job(tuple(res), p, seed) for res in resolutions for p in range(n_prompts) for seed in seeds]
