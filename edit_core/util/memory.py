"""Peak memory of the tensors a piece of code allocates, on any device, real or fake.

PyTorch's CPU allocator keeps no statistics, and fake tensors (``FakeTensorMode``: shapes
and dtypes, no data) allocate nothing at all, so ``PeakTensorMemory`` counts storages as
operators create them (a TorchDispatchMode) and releases a storage when it is freed: when
the last tensor the mode saw on it dies and the storage itself is gone (a weak reference to
the storage, so an alias made outside the dispatcher keeps it counted). What it reports is
the peak of *extra* memory: storages that existed before (weights, inputs, optimizer
state) are not counted, also when an operator returns a view of them or writes into them.

Not counted: meta tensors (no memory behind them), allocator rounding and fragmentation, workspaces kernels allocate internally
(cuBLAS, cuDNN, flash attention), the CUDA context. On CUDA the caching allocator's own
peak is reported beside it.
"""
import weakref

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage that also works for meta and fake tensors (no data pointer)."""
    return t.untyped_storage()._cdata


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared weights counted once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            s = t.untyped_storage()
            seen[s._cdata] = s.nbytes()
    return sum(seen.values())


class PeakTensorMemory(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages = {}  # storage key -> [weak ref to the storage, bytes, tensors seen alive]
        self._orphans = set()  # keys whose seen tensors died while the storage was still alive

    def _free(self, key):
        self.live -= self._storages.pop(key)[1]
        self._orphans.discard(key)

    def _tensor_died(self, key, ref):
        entry = self._storages.get(key)
        if entry is None or entry[0] is not ref:
            return
        entry[2] -= 1
        if entry[2] == 0:
            if ref.expired():
                self._free(key)
            else:
                self._orphans.add(key)

    def _sweep(self):
        for key in [k for k in self._orphans if self._storages[k][0].expired()]:
            self._free(key)

    def _track(self, t: torch.Tensor, input_keys):
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        if entry is not None and entry[0].expired():  # a freed storage's address reused
            self._free(key)
            entry = None
        if entry is None:
            if key in input_keys:  # a view of, or a write into, memory that existed before
                return
            entry = self._storages[key] = [StorageWeakRef(storage), 0, 0]
        grown = storage.nbytes() - entry[1]  # new, or resized in place (out= ops)
        if grown > 0:
            entry[1] += grown
            self.live += grown
            self.peak = max(self.peak, self.live)
        entry[2] += 1
        self._orphans.discard(key)
        weakref.finalize(t, self._tensor_died, key, entry[0])

    def __exit__(self, *exc):
        self._sweep()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()  # a tensor's finalizer runs just before its storage is released
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        input_ids = {id(a) for a in inputs}
        input_keys = {storage_key(a) for a in inputs if a.layout == torch.strided}
        for t in tree_flatten(out)[0]:
            # Meta tensors hold no memory (fake tensors, which stand for real ones, report
            # the device they stand for, not "meta").
            if (isinstance(t, torch.Tensor) and id(t) not in input_ids and t.layout == torch.strided
                    and t.device.type != "meta"):
                self._track(t, input_keys)
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
