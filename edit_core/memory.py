"""Peak memory of the tensors a piece of code allocates, on any device.

PyTorch's CPU allocator keeps no statistics, so ``PeakTensorMemory`` counts storages as
operators create them (a TorchDispatchMode) and releases them when the last tensor on a
storage is freed. What it reports is the peak of *extra* memory: tensors that already
existed (weights, inputs) are not counted. On CUDA the caching allocator's own peak is
reported beside it.
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs = {}  # storage data_ptr -> [tensor count, bytes]

    def _release(self, key):
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def _track(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in inputs and t.layout == torch.strided:
                self._track(t)
        return out


def measure_peak(fn, device) -> dict:
    """Run fn once; return {'peak_extra_bytes': ...} (and the CUDA allocator's peak on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with PeakTensorMemory() as mode:
        fn()
    result = {"peak_extra_bytes": mode.peak}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["cuda_peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base
    return result
