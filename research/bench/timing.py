"""Timing several variants of one computation fairly: round robin, a time budget, peak memory.

Each variant first runs once under ``measure_peak`` (peak extra tensor memory; the CUDA
allocator's peak too on a GPU): that run is its first warm-up. Compiled code cannot run under
the tensor counter (a dispatch mode), so with ``count_tensors=False`` only the CUDA allocator's
peak is taken, on the third call (the first compiles, and is timed as such; the second may
compile again or record a CUDA graph). A variant that returns a float has timed itself (the block level: one block
inside a model call) and that time is used instead of the call's. The remaining warm-ups and
the timed repeats then go round robin (baseline, edit, bound, baseline, ...), so load from
other processes hits all variants alike and their ratios stay meaningful. A variant gets as
many repeats (at most ``repeats``, at least one) as fit in ``budget`` seconds at the pace of
its last warm-up. A warm-up run that alone takes longer than the budget becomes the one timed
sample (further warm-up would change such a run by far less than run-to-run noise); the
table marks those points.
"""
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from edit_core.util.memory import measure_peak
from edit_core.comfyui.speed import sync


@dataclass
class Measurement:
    times: List[float] = field(default_factory=list)
    peak_bytes: Optional[int] = 0
    cuda_peak_bytes: Optional[int] = None
    cold: bool = False  # the one sample is the (long) first warm-up run
    first_run_s: Optional[float] = None  # compiled: the first call, compilation included

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def repeats(self) -> int:
        return len(self.times)


def _timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out if isinstance(out, float) else time.perf_counter() - t0


def allocator_peak(fn, device) -> dict:
    """Run fn once; the CUDA allocator's peak of extra memory (nothing counted on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        fn()
        return {"peak_extra_bytes": None, "cuda_peak_extra_bytes": None}
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    return {"peak_extra_bytes": peak, "cuda_peak_extra_bytes": peak}


def measure(variants: Dict[str, Callable[[], object]], device, repeats: int = 5, warmup: int = 1,
            budget: float = 60.0, count_tensors: bool = True) -> Dict[str, Measurement]:
    """Median-ready times and peak memory for each variant (see the module docstring)."""
    out = {name: Measurement() for name in variants}
    last = {}
    for name, fn in variants.items():
        if not count_tensors:
            # Compiled: the first call compiles, the second may compile again (a guard on state the
            # first call changed, e.g. the bound's zero-tensor cache) or record a CUDA graph.
            t0 = time.perf_counter()
            fn()
            sync(device)
            out[name].first_run_s = time.perf_counter() - t0
            fn()
        result = []
        t0 = time.perf_counter()
        peak = (measure_peak if count_tensors else allocator_peak)(lambda: result.append(fn()), device)
        sync(device)
        last[name] = result[0] if isinstance(result[0], float) else time.perf_counter() - t0
        out[name].peak_bytes = peak["peak_extra_bytes"]
        out[name].cuda_peak_bytes = peak.get("cuda_peak_extra_bytes")
        if last[name] >= budget:
            out[name].times, out[name].cold = [last[name]], True
    live = [n for n in variants if not out[n].cold]
    for _ in range(max(0, warmup - 1)):
        for name in list(live):
            last[name] = _timed(variants[name], device)
            if last[name] >= budget:
                out[name].times, out[name].cold = [last[name]], True
                live.remove(name)
    planned = {n: max(1, min(repeats, int(budget // max(last[n], 1e-9)))) for n in live}
    for r in range(max(planned.values(), default=0)):
        for name in live:
            if r < planned[name]:
                out[name].times.append(_timed(variants[name], device))
    return out
