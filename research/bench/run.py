"""The benchmark's grid run: for every point (level, model, resolution, batch, prompt length)
the unpatched baseline with ComfyUI's SDPA attention, the EDiT-patched computation and the
Amdahl bound (the baseline with its image self-attentions costing nothing), all in one run;
``cases``, ``timing`` and ``backends`` say what exactly runs and how it is timed."""
import gc
import json
import os
import time
from typing import Callable, Optional, Sequence

import torch

import comfy.model_management

from .cases import Case, Point
from .grid import BATCHES, FAMILIES, LEVELS, PROMPTS, RESOLUTIONS, default_device
from .models import full_depth
from .report import Row, write
from .timing import measure


def run_benchmark(levels: Sequence[str] = LEVELS, families: Sequence[str] = FAMILIES,
                  resolutions: Sequence[int] = RESOLUTIONS, batches: Sequence[int] = BATCHES,
                  prompts: Sequence[int] = PROMPTS, repeats: int = 5, warmup: int = 1, budget: float = 60.0,
                  depth: Optional[int] = None, device=None, dtype=None, out="results", threads: Optional[int] = None,
                  tiny: bool = False, log: Callable[[str], None] = print, compile_backends: Sequence[str] = (),
                  eager: bool = True, deadline: Optional[float] = None, bank_hparams: Optional[dict] = None):
    """Run the grid; write results.md, results.json and PNG plots to ``out`` (rewritten
    after every point, so an interrupted run keeps what it measured). Returns (rows, paths).

    Defaults: CUDA in bf16 when present, else CPU in float32; model depth 2 on CPU, the
    real depth on CUDA; torch's own thread count. ``tiny`` swaps the real widths for tiny
    ones: a smoke test of the machinery, not a benchmark. ``threads`` holds for this run only.
    ``compile_backends``: the model level runs again under ComfyUI's torch.compile wrapper
    with each backend (``eager=False``: only compiled at the model level). ``deadline`` (a
    ``time.time()`` value): points not started by then are skipped and listed in the
    settings as such. ``bank_hparams``: the EDiT bank's hyper-parameters (default: its defaults)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(levels, families, resolutions, batches, prompts, repeats, warmup, budget, depth, device, dtype, out,
                    tiny, log, compile_backends, eager, deadline, bank_hparams or {})
    finally:
        torch.set_num_threads(threads_before)


def _run(levels, families, resolutions, batches, prompts, repeats, warmup, budget, depth, device, dtype, out, tiny, log,
         compile_backends, eager, deadline, bank_hparams):
    """run_benchmark's grid, its device, dtype and threads settled."""
    settings = {**({"bank": json.dumps(bank_hparams, sort_keys=True)} if bank_hparams else {}),
                "device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                "repeats": repeats, "warm-up": warmup, "budget s": budget, "load average at start": _load()}
    if "model" in levels:
        settings["model depth"] = depth or ("2" if device.type == "cpu" or tiny else "full")
        if compile_backends:
            settings["compiled"] = ", ".join(compile_backends) + " (model level; ComfyUI's TorchCompileModel path)"
    if tiny:
        settings["widths"] = "TINY (smoke test, not a benchmark)"
    skipped = []
    rows, paths = [], {}
    for level in levels:
        modes = ([None] if eager or level != "model" else []) + (list(compile_backends) if level == "model" else [])
        for compiled in modes:
            for family in families:
                points = [Point(family, level, px, b, p) for px in resolutions for b in batches for p in prompts]
                if deadline is not None and time.time() >= deadline:
                    skipped += [_name(pt, compiled) for pt in points]
                    continue
                d = depth or (2 if device.type == "cpu" or tiny else full_depth(family))
                case = Case(family, level, dtype, device, depth=d, tiny=tiny, compile_backend=compiled,
                            bank_hparams=bank_hparams)
                log(f"== {level} / {case.describe()} on {device} ({settings['dtype']})")
                for point in points:
                    if deadline is not None and time.time() >= deadline:
                        skipped.append(_name(point, compiled))
                        continue
                    variants, extras = case.variants(point)
                    meas = measure(variants, device, repeats, warmup, budget, count_tensors=not compiled)
                    rows.append(Row.of(point, meas, extras, compiled))
                    log(_line(rows[-1]))
                    del variants, extras, meas
                    settings["load average at end"] = _load()
                    if skipped:
                        settings["skipped (time limit)"] = "; ".join(skipped)
                    paths = write(rows, out, settings, str(device))
                case.close()
                del case
                gc.collect()
                comfy.model_management.unload_all_models()
                comfy.model_management.soft_empty_cache()
    if skipped:
        settings["skipped (time limit)"] = "; ".join(skipped)
        log(f"time limit reached: skipped {len(skipped)} points")
    paths = write(rows, out, settings, str(device))
    return rows, paths


def _name(p: Point, compiled: Optional[str]) -> str:
    mode = f" compiled ({compiled})" if compiled else ""
    return f"{p.level}{mode} {p.family} {p.px} px b{p.batch} p{p.prompt}"


def _load() -> str:
    """The 1-minute load average: other processes on the machine skew CPU timings."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def _line(r: Row) -> str:
    s = (f"{r.level}{' ' + r.mode if r.compiled else ''} {r.family} {r.px} px ({r.tokens} tokens) b{r.batch} p{r.prompt}: baseline "
         f"{r.median('baseline'):.3f} s, EDiT {r.median('edit'):.3f} s -> {r.speedup:.2f}x")
    if r.fraction is not None:
        s += f"; bound {r.median('bound'):.3f} s ({r.bound_speedup:.2f}x), {r.fraction:.0%} of it"
    if r.compiled:
        for what, values in (("graph breaks", r.graph_breaks), ("recompiles", r.recompiles)):
            s += f"; {what} b/e/z " + "/".join(str(values.get(n)) for n in ("baseline", "edit", "bound"))
    return s
