"""Time a ComfyUI model with EDiT off (teacher) and on (student) on its own device."""
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

import comfy.model_management

from ..errors import EDiTError
from .model import conditioning_dims, diffusion_model
from ..util.memory import measure_peak
from .patcher import STUDENT, TEACHER, call_model, edit_bank_of
from ..util.plots import bar_chart


def model_inputs(patcher, batch: int, width: int, height: int, prompt_tokens: int, seed: int = 0) -> Dict:
    """Random inputs for ``model.apply_model`` at a pixel size (latent = pixels / 8), mid-schedule sigma."""
    dm = diffusion_model(patcher)
    ctx_dim, pooled_dim = conditioning_dims(patcher)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dm.in_channels, max(1, height // 8), max(1, width // 8), generator=g)
    inputs = {"x": x, "c_crossattn": torch.randn(batch, prompt_tokens, ctx_dim, generator=g)}
    if pooled_dim:
        inputs["y"] = torch.randn(batch, pooled_dim, generator=g)
    sigma = patcher.get_model_object("model_sampling").percent_to_sigma(0.5)
    inputs["t"] = torch.full((batch,), float(sigma))
    return {k: v.to(patcher.load_device) for k, v in inputs.items()}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], repeats: int, warmup: int, device, on_run: Optional[Callable] = None) -> List[float]:
    """Seconds per run for ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
        if on_run:
            on_run()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if on_run:
            on_run()
    return times


@dataclass
class SpeedReport:
    width: int
    height: int
    batch: int
    prompt_tokens: int
    device: str
    times: Dict[str, List[float]] = field(default_factory=dict)
    peak_bytes: Dict[str, int] = field(default_factory=dict)

    def median(self, mode: str) -> float:
        return statistics.median(self.times[mode])

    @property
    def speedup(self) -> float:
        return self.median(TEACHER) / self.median(STUDENT)

    def text(self) -> str:
        lines = [f"EDiT speed test: {self.width}x{self.height} px, batch {self.batch}, {self.prompt_tokens} prompt "
                 f"tokens, on {self.device}"]
        for mode, label in ((TEACHER, "original attention"), (STUDENT, "EDiT")):
            lines.append(f"{label:>18}: {self.median(mode) * 1000:9.1f} ms per model call (median of "
                         f"{len(self.times[mode])}), peak extra tensor memory "
                         f"{self.peak_bytes[mode] / 2**20:8.1f} MiB")
        lines.append(f"{'speed-up':>18}: {self.speedup:.2f}x")
        return "\n".join(lines)

    def image(self):
        return bar_chart(f"Model call, {self.width}x{self.height} px, batch {self.batch} ({self.device})",
                         ["original attention", "EDiT"], [self.median(TEACHER) * 1000, self.median(STUDENT) * 1000],
                         "ms", note=f"EDiT speed-up {self.speedup:.2f}x")


@torch.no_grad()
def speed_test(patcher, width: int, height: int, batch: int = 1, prompt_tokens: int = 154, repeats: int = 3,
               warmup: int = 1, on_run: Optional[Callable] = None) -> SpeedReport:
    """Time one model call (the whole transformer) with EDiT off and on, same inputs, same run.

    ``patcher`` must be an EDiT-patched model (Apply EDiT's output). ``on_run`` is called after
    every run (progress; ComfyUI's ProgressBar also stops the loop on /interrupt).
    """
    if edit_bank_of(patcher) is None:
        raise EDiTError("the speed test needs an EDiT-patched model: connect the MODEL output of Apply EDiT")
    # The bank is an additional model: load it with the model, as sampling does, so no call
    # copies its weights to the device.
    comfy.model_management.load_models_gpu([patcher] + patcher.get_nested_additional_models())
    inputs = model_inputs(patcher, batch, width, height, prompt_tokens)
    conds = {k: v for k, v in inputs.items() if k not in ("x", "t")}
    device = patcher.load_device
    report = SpeedReport(width, height, batch, prompt_tokens, str(device))
    for mode in (TEACHER, STUDENT):
        def call(mode=mode):
            return call_model(patcher, inputs["x"], inputs["t"], conds, mode)
        report.times[mode] = median_time(call, repeats, warmup, device, on_run)
        report.peak_bytes[mode] = measure_peak(call, device)["peak_extra_bytes"]
    return report
