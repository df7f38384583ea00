"""Teacher data on disk: what regenerating the teacher's features needs, not the features.

Per image (one safetensors shard per resolution x prompt x seed):
    latent   the teacher's final latent (C, h, w), float32, as KSampler returns it
    sigmas   the sigma of every model call the sampler made (the schedule the teacher saw)
    states   the model input of some of those calls (K, C, h, w), float16, evenly spread over
             the schedule: as many as fit IMAGE_BUDGET (all of them for small images)
    calls    which calls ``states`` are (K,)
Per prompt, once (``cond_p{index}``), and once for the negative prompt (``cond_negative``):
    the conditioning rows the model received (c_crossattn, y, ...), as the sampler built them.

Training examples take a stored state, or re-noise the final latent at a call's sigma, and
run the teacher online (see examples.py, losses.py): nothing per layer is stored. An image
takes at most IMAGE_BUDGET bytes (2 MiB, header included): at 1024 px an SD3.5 image is its
1 MiB final latent plus 1 state, a PixArt image 0.25 MiB plus 13 states.

Every file is written to a temporary name, flushed to disk and renamed, so a file under its
final name is complete. A file that does not read back (truncated, foreign) is regenerated:
it is derived data, and the teacher reproduces it exactly.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open

from ..util.safetensors_io import complete, save_safetensors

FORMAT = "comfyui-edit-teacher-data"
SHARD_HEADER_BYTES = 1024  # safetensors header + metadata of one image shard (measured: ~500)
IMAGE_BUDGET = 2 * 2**20   # bytes on disk per image, header included


@dataclass(frozen=True)
class ImageJob:
    resolution: Tuple[int, int]
    prompt: int
    seed: int

    @property
    def name(self) -> str:
        return f"image_{self.resolution[0]}x{self.resolution[1]}_p{self.prompt:04d}_s{self.seed}"


def latent_bytes(latent_channels: int, resolution: Tuple[int, int], element_size: int = 4) -> int:
    w, h = resolution
    return element_size * latent_channels * (h // 8) * (w // 8)


def max_calls(sample_steps: int) -> int:
    """Model calls of a sampler run: at most 2 per step for the second-order samplers
    ComfyUI ships (heun, dpm_2: ``2 * steps - 1``)."""
    return 2 * sample_steps


def stored_states(latent_channels: int, resolution: Tuple[int, int], calls: int) -> int:
    """How many float16 call states of an image fit IMAGE_BUDGET beside its final latent, the
    call sigmas and the file's header (each state also takes its call index)."""
    room = IMAGE_BUDGET - latent_bytes(latent_channels, resolution) - 8 * calls - SHARD_HEADER_BYTES
    return max(0, min(calls, room // (latent_bytes(latent_channels, resolution, 2) + 8)))


def image_bytes(latent_channels: int, resolution: Tuple[int, int], sample_steps: int) -> int:
    """Bytes on disk of one image shard at most: final latent, states, call sigmas, header."""
    calls = max_calls(sample_steps)
    states = stored_states(latent_channels, resolution, calls)
    return (latent_bytes(latent_channels, resolution) + states * (latent_bytes(latent_channels, resolution, 2) + 8)
            + 8 * calls + SHARD_HEADER_BYTES)


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
    save_safetensors(tensors, path, dict(meta, format=FORMAT))  # unique temporary names: ranks may write one file


def _read(path: Path, load: bool = True) -> Optional[Dict[str, torch.Tensor]]:
    """The file's tensors (load=False: their shapes, from the header, checked against the
    file's size), or None when it is missing, truncated or not ours."""
    if not path.is_file() or complete(path) is not None:
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") != FORMAT or not f.keys():
                return None
            return {k: f.get_tensor(k).clone() if load else tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


IMAGE_KEYS = {"latent", "sigmas", "states", "calls"}


def _image_fits(job: ImageJob, shapes: Dict[str, Tuple[int, ...]]) -> bool:
    """An image shard's tensors have the shapes its job implies (a planted or foreign file
    with the right keys does not pass)."""
    if set(shapes) != IMAGE_KEYS:
        return False
    latent, states = shapes["latent"], shapes["states"]
    w, h = job.resolution
    return (len(latent) == 3 and latent[1:] == (h // 8, w // 8) and len(shapes["sigmas"]) == 1
            and shapes["sigmas"][0] > 0 and len(states) == 4 and states[1:] == latent
            and shapes["calls"] == (states[0],) and states[0] <= shapes["sigmas"][0])


class TeacherData:
    """One folder of teacher data (its name is the teacher's fingerprint)."""

    def __init__(self, directory):
        self.dir = Path(directory)

    def image_path(self, job: ImageJob) -> Path:
        return self.dir / f"{job.name}.safetensors"

    def cond_path(self, prompt: Optional[int]) -> Path:
        return self.dir / ("cond_negative.safetensors" if prompt is None else f"cond_p{prompt:04d}.safetensors")

    def image(self, job: ImageJob) -> Optional[Dict[str, torch.Tensor]]:
        """{latent (C, h, w), sigmas (n,), states (K, C, h, w), calls (K,)} or None when
        missing or unreadable."""
        read = _read(self.image_path(job))
        if read is None or not _image_fits(job, {k: tuple(v.shape) for k, v in read.items()}):
            return None
        if not bool(((read["calls"] >= 0) & (read["calls"] < len(read["sigmas"]))).all()):
            return None
        return read

    def conds(self, prompt: Optional[int]) -> Optional[Dict[str, torch.Tensor]]:
        """A prompt's (None: the negative prompt's) conditioning rows, or None."""
        return _read(self.cond_path(prompt))

    def has(self, job: ImageJob, needs_negative: bool) -> bool:
        """Whether the job's image and its prompt's conditioning are on disk and read back
        (headers only); anything else is (re)generated."""
        image = _read(self.image_path(job), load=False)
        return (image is not None and _image_fits(job, image)
                and _read(self.cond_path(job.prompt), load=False) is not None
                and (not needs_negative or _read(self.cond_path(None), load=False) is not None))

    def write(self, job: ImageJob, latent: torch.Tensor, sigmas: torch.Tensor, states: torch.Tensor,
              cond: Dict[str, torch.Tensor], uncond: Optional[Dict[str, torch.Tensor]]):
        """``states``: the model input of every call (n, C, h, w); those that fit are kept.
        Conditioning first, image last: the image's presence means the job is complete."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if _read(self.cond_path(job.prompt), load=False) is None:
            _write(self.cond_path(job.prompt), cond, {"prompt": str(job.prompt)})
        if uncond is not None and _read(self.cond_path(None), load=False) is None:
            _write(self.cond_path(None), uncond, {"prompt": "negative"})
        k = stored_states(latent.shape[0], job.resolution, len(states))
        calls = torch.linspace(0, len(states) - 1, k).round().long() if k else torch.zeros(0, dtype=torch.long)
        _write(self.image_path(job), {"latent": latent.float(), "sigmas": sigmas.float(), "calls": calls,
                                      "states": states[calls].half()},
               {"job": json.dumps({"resolution": list(job.resolution), "prompt": job.prompt, "seed": job.seed})})

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.dir.glob("*.safetensors")) if self.dir.is_dir() else 0


def image_jobs(resolutions, n_prompts: int, seeds) -> List[ImageJob]:
    return [ImageJob(tuple(res), p, seed) for res in resolutions for p in range(n_prompts) for seed in seeds]
