"""Teacher trajectories on disk: one safetensors shard per (resolution, prompt, seed).

A shard holds every model call the teacher made while sampling that trajectory, split into
one *sample* per batch row (CFG's cond and uncond rows are separate samples). Per sample:

    {i}.x            model input latent (C, h, w)          {i}.t    sigma ()
    {i}.cond.{name}  the call's conditioning (c_crossattn, y, ...), batch row i
    {i}.out          the teacher's denoised output (C, h, w)
    {i}.in.{group}.{field}  converted layers' inputs (SD3: per block x, context, c; PixArt:
                     per attention x), from which ``layer_inputs`` recomputes q, k, v
    {i}.ref.{layer}  the teacher's attention output (image rows) of each converted layer

Shards are written atomically, so a shard on disk is complete; an interrupted generation
resumes by writing the missing ones.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass(frozen=True)
class Job:
    resolution: Tuple[int, int]
    prompt: int
    seed: int

    @property
    def name(self) -> str:
        return f"traj_{self.resolution[0]}x{self.resolution[1]}_p{self.prompt:04d}_s{self.seed}"


def input_group(layer: str) -> str:
    """SD3's attn and attn2 of a block share the block's inputs; PixArt's are per attention."""
    return layer.rsplit(".", 1)[0] if layer.startswith("joint_blocks.") else layer


@dataclass(frozen=True)
class SampleRef:
    path: Path
    index: int


class Sample:
    """One cached sample, read lazily from its shard."""

    def __init__(self, ref: SampleRef, device, dtype=None):
        self.ref, self.device, self.dtype = ref, device, dtype
        with safe_open(str(ref.path), framework="pt") as f:
            meta = f.metadata()
            prefix = f"{ref.index}."
            self.tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        self.grid = tuple(json.loads(meta["grid"]))

    def get(self, key: str) -> torch.Tensor:
        t = self.tensors[key].to(self.device)
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def conds(self) -> Dict[str, torch.Tensor]:
        return {k[len("cond."):]: self.get(k).unsqueeze(0) for k in self.tensors if k.startswith("cond.")}

    def layer_inputs(self, layer: str) -> Dict[str, torch.Tensor]:
        prefix = f"in.{input_group(layer)}."
        return {k[len(prefix):]: self.get(k).unsqueeze(0) for k in self.tensors if k.startswith(prefix)}

    def reference(self, layer: str) -> torch.Tensor:
        return self.get(f"ref.{layer}").unsqueeze(0)


class TrajectoryCache:
    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, job: Job) -> Path:
        return self.dir / f"{job.name}.safetensors"

    def has(self, job: Job) -> bool:
        return self.path(job).is_file()

    def write(self, job: Job, grid, samples: List[Dict[str, torch.Tensor]], info: List[Dict]):
        tensors = {f"{i}.{k}": v.detach().cpu().clone(memory_format=torch.contiguous_format) for i, s in enumerate(samples) for k, v in s.items()}
        meta = {"grid": json.dumps(list(grid)), "samples": json.dumps(info), "job": json.dumps(
            {"resolution": job.resolution, "prompt": job.prompt, "seed": job.seed})}
        tmp = self.path(job).with_suffix(".tmp")
        save_file(tensors, str(tmp), meta)
        os.replace(tmp, self.path(job))

    def samples(self, jobs: List[Job], resolution: Optional[Tuple[int, int]] = None) -> List[SampleRef]:
        """Every sample of the given jobs (optionally of one resolution), in a fixed order."""
        refs = []
        for job in jobs:
            if resolution is not None and tuple(job.resolution) != tuple(resolution):
                continue
            with safe_open(str(self.path(job)), framework="pt") as f:
                n = len(json.loads(f.metadata()["samples"]))
            refs.extend(SampleRef(self.path(job), i) for i in range(n))
        return refs
