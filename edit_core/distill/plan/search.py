"""The plan: rows of measured peaks per resolution and mode against the device's budget,
the teacher data's size, the operations the whole run takes and the time they mean on an
assumed card, the settings that would fit when the requested ones do not, and ``check_fits``,
what the node and the distill CLI call before any work."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import psutil
import torch

from ...bank import BankConfig
from ...errors import EDiTError
from ..config import DistillConfig
from ..teacher_data import image_bytes, teacher_data_bytes
from .harness import GiB, MiB, Measured, PlanModel, arch_key, bank_key, fake_model, gib, measure, px

STEP_MODES = ("layerwise", "e2e")
# The memory targets for both families: (mode, resolution px) -> GiB, bf16, batch 1.
STEP_TARGETS = {("layerwise", 1024): 16.0, ("layerwise", 2048): 22.0, ("e2e", 1024): 20.0}
TEACHER_DATA_TARGET = 2 * MiB  # per image at 1024 px
FALLBACK_RESOLUTIONS = (1536, 1024, 768, 512)


@dataclass(frozen=True)
class Throughput:
    """The device speed that turns counted operations into time: assumed, not measured."""
    tflops: float = 165.0      # RTX 4090 (24 GB): bf16 tensor cores, dense, fp32 accumulation
    utilisation: float = 0.35  # share of that a distillation step reaches: an assumption

    def seconds(self, flops: float) -> float:
        return flops / (self.tflops * 1e12 * self.utilisation)

    def describe(self) -> str:
        return (f"{self.tflops:g} TFLOPS bf16 x {self.utilisation:.0%} utilisation = "
                f"{self.tflops * self.utilisation:.0f} TFLOPS (assumed, not measured)")


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class Row:
    resolution: Tuple[int, int]  # (width, height) px
    mode: str       # "layerwise" or "e2e"
    batch: int
    teacher: Measured
    step: Measured
    layers_per_step: int = 0

    def fits(self, budget: int) -> bool:
        return max(self.teacher.peak, self.step.peak) <= budget


@dataclass
class Plan:
    model: str
    description: str
    budget: int                     # device bytes the run may use (after the reserve)
    device_note: str
    rows: List[Row]
    teacher_data: Optional[Dict] = None  # {"bytes", "images", "per_image"}
    suggestions: List[str] = field(default_factory=list)
    targets: List[Tuple[str, str, Optional[bool]]] = field(default_factory=list)  # (what, measured, passed or None: information)
    refuse: bool = True             # False where the device's memory is not a hard limit (CPU)
    throughput: Throughput = Throughput()
    cost: Optional[Dict] = None     # run_cost(): operations of the teacher data and the training

    @property
    def fits(self) -> bool:
        return all(r.fits(self.budget) for r in self.rows)

    def table(self) -> str:
        lines = [f"EDiT distillation plan: {self.model} ({self.description})", self.device_note]
        if self.teacher_data:
            td = self.teacher_data
            lines.append(f"teacher data on disk: {td['bytes'] / MiB:.1f} MiB for {td['images']} images "
                         f"({td['per_image'] / MiB:.2f} MiB per image)")
        lines += ["", "| resolution | mode | batch | teacher pass (GiB) | training step (GiB) | fits "
                  "| training step (TFLOP) | step time on the assumed card |", "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            mode = f"{r.mode} ({r.layers_per_step} layers)" if r.layers_per_step else r.mode
            lines.append(f"| {px(r.resolution)} | {mode} | {r.batch} | {gib(r.teacher.peak)} | {gib(r.step.peak)} | "
                         f"{'yes' if r.fits(self.budget) else 'NO'} | {r.step.flops / 1e12:.1f} | "
                         f"{self.throughput.seconds(r.step.flops):.2f} s |")
        if self.cost:
            c, t = self.cost, self.throughput
            lines += ["", f"time on the assumed card, {t.describe()}:",
                      f"- teacher data: {c['images']} images x {c['sample_steps']} sampler calls, "
                      f"{c['teacher_flops'] / 1e15:.2f} PFLOP: {duration(t.seconds(c['teacher_flops']))}",
                      f"- training: {c['train_steps']} steps, {c['train_flops'] / 1e15:.2f} PFLOP: "
                      f"{duration(t.seconds(c['train_flops']))}",
                      f"- in all: {duration(t.seconds(c['teacher_flops'] + c['train_flops']))}"]
        if self.targets:
            lines += ["", "targets (bf16, batch 1):"]
            lines += [f"- {what}: {measured} {'(for information)' if ok is None else 'PASS' if ok else 'FAIL'}"
                      for what, measured, ok in self.targets]
        if self.suggestions:
            lines += ["", "settings that would fit:"] + [f"- {s}" for s in self.suggestions]
        return "\n".join(lines)


def run_cost(model: PlanModel, config: DistillConfig, n_prompts: int) -> Dict:
    """Operations of a whole distillation with ``config``: every teacher image's sampler calls
    (CFG's two rows in one call) and every phase's training steps, as counted on the
    full-size model."""
    images = n_prompts * len(config.seeds)
    teacher = sum(images * config.sample_steps * measure(model, "teacher", 1, tuple(r)).flops
                  for r in config.resolutions)
    train = sum(p.steps * measure(model, p.mode, config.batch_size, p.resolution, config.layers_per_step).flops
                for p in config.phases())
    return {"images": images * len(config.resolutions), "sample_steps": config.sample_steps,
            "train_steps": config.train_steps, "teacher_flops": teacher, "train_flops": train}


def row(model: PlanModel, resolution: Tuple[int, int], mode: str, batch: int, layers_per_step: int = 0) -> Row:
    return Row(resolution, mode, batch, measure(model, "teacher", 1, resolution),
               measure(model, mode, batch, resolution, layers_per_step), layers_per_step)


def modes_of(mode: str) -> Tuple[str, ...]:
    return STEP_MODES if mode == "layerwise+e2e" else (mode,)


def suggestions(model: PlanModel, resolutions: Sequence[Tuple[int, int]], mode: str, batch: int, budget: int,
                layers_per_step: int = 0) -> List[str]:
    """Settings that would fit where the requested ones do not: a smaller batch, fewer layers
    per step, layer-wise only, a lower top resolution. Each one is measured, not guessed."""
    def fits(res=resolutions, modes=modes_of(mode), b=batch, k=layers_per_step):
        return all(row(model, r, m, b, k).fits(budget) for r in res for m in modes)

    if fits():
        return []
    out = []
    for b in range(batch - 1, 0, -1):
        if fits(b=b):
            out.append(f"--batch-size {b}")
            break
    n = len(model.bank.config.layers)
    for k in (n // 2, n // 4, 1):
        if 0 < k < (layers_per_step or n) and fits(k=k):
            out.append(f"--layers-per-step {k}")
            break
    if mode != "layerwise" and fits(modes=("layerwise",)):
        out.append("--mode layerwise")
    area = lambda r: r[0] * r[1]
    top = max(map(area, resolutions))
    candidates = {*resolutions, *((r, r) for r in FALLBACK_RESOLUTIONS)}
    for r in sorted((c for c in candidates if area(c) < top), key=area, reverse=True):
        kept = [s for s in resolutions if area(s) < area(r)] + [r]
        if fits(res=kept):
            out.append(f"--resolutions {' '.join(f'{w}x{h}' if w != h else str(w) for w, h in sorted(kept, key=area))}"
                       f" (top resolution {px(r)})")
            break
    return out or ["nothing tried fits: use a device with more memory"]


def targets(model: PlanModel, prompts: int, seeds: int) -> List[Tuple[str, str, Optional[bool]]]:
    """The memory and disk targets for this model: training steps measured at batch 1, and teacher
    data per image at 1024 px (conditioning shared by a prompt's seeds)."""
    out = []
    for (mode, res), limit in STEP_TARGETS.items():
        peak = measure(model, mode, 1, (res, res)).peak
        out.append((f"{'layer-wise' if mode == 'layerwise' else 'end-to-end'} step <= {limit:g} GiB @{res} px",
                    f"{gib(peak)} GiB", peak <= limit * GiB))
    per_image = teacher_data_estimate(model, [(1024, 1024)], prompts, seeds)["per_image"]
    shard = image_bytes(model.trainer.model.latent_format.latent_channels, (1024, 1024), DistillConfig().sample_steps)
    out.append(("teacher data <= 2 MiB per image @1024 px: the image's own file", f"{shard / MiB:.3f} MiB ({shard} B)",
                shard <= TEACHER_DATA_TARGET))
    # The conditioning is kept once per prompt, not per image (by design): its share
    # per image is shown, not held against the per-image target.
    out.append((f"teacher data per image @1024 px with its share of the conditioning files "
                f"({prompts} prompts x {seeds} seeds, and the negative prompt)", f"{per_image / MiB:.2f} MiB", None))
    return out


def teacher_data_estimate(model: PlanModel, resolutions: Sequence[Tuple[int, int]], n_prompts: int, n_seeds: int,
                          config=None, prompt_tokens: Optional[int] = None) -> Dict:
    """Teacher data on disk, as the distillation writes it (teacher_data.teacher_data_bytes): per
    image its final latent and call sigmas, per prompt (and the negative prompt) its
    conditioning, float32."""
    from ...comfyui.model import conditioning_dims
    from ...comfyui.architectures import PROMPT_TOKENS
    channels = model.trainer.model.latent_format.latent_channels
    context_dim, pooled_dim = conditioning_dims(model.trainer)
    tokens = prompt_tokens or PROMPT_TOKENS[model.spec.family]
    cond = 4 * (tokens * context_dim + pooled_dim)
    total = teacher_data_bytes(channels, resolutions, n_prompts, n_seeds, cond, config or DistillConfig())
    images = len(resolutions) * n_prompts * n_seeds
    return {"bytes": total, "images": images, "per_image": total / images}


def device_budget(device, reserve: int, device_memory: Optional[int] = None) -> Tuple[int, str, bool]:
    """(bytes the run may use, a line saying where that came from, whether to refuse over it)."""
    if device_memory is not None:
        return device_memory - reserve, (f"device memory {gib(device_memory)} GiB, {gib(reserve)} GiB kept for "
                                         f"the CUDA context and fragmentation: budget {gib(device_memory - reserve)} GiB"), True
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        usable = free + torch.cuda.memory_reserved(device)  # ComfyUI can unload what this process holds
        return usable - reserve, (f"{device}: {gib(usable)} GiB free to this process (of {gib(total)} GiB), "
                                  f"{gib(reserve)} GiB kept for fragmentation: budget {gib(usable - reserve)} GiB"), True
    available = psutil.virtual_memory().available
    return available, (f"{device}: {gib(available)} GiB RAM available; on a CPU the run is not refused "
                       "(the OS can swap), the table says what it will use"), False


def make_plan(model_config, name: str, resolutions: Sequence[Tuple[int, int]], mode: str, batch: int, budget_line,
              bank_config: Optional[BankConfig] = None, dtype=torch.bfloat16, prompts: int = 0, seeds: int = 0,
              layers_per_step: int = 0, with_targets: bool = False, distill_config=None,
              throughput: Throughput = Throughput()) -> Plan:
    """``distill_config`` (with ``prompts``): also what the whole run costs (run_cost)."""
    model = fake_model(arch_key(model_config), bank_key(bank_config), str(dtype).replace("torch.", ""))
    budget, note, refuse = budget_line
    resolutions = sorted(set(map(tuple, resolutions)), key=lambda r: (r[0] * r[1], r))
    rows = [row(model, r, m, batch, layers_per_step) for r in resolutions for m in modes_of(mode)]
    plan = Plan(name, model.describe(), budget, note, rows, refuse=refuse, throughput=throughput)
    if prompts and seeds:
        plan.teacher_data = teacher_data_estimate(model, resolutions, prompts, seeds, distill_config)
    if prompts and distill_config is not None:
        plan.cost = run_cost(model, distill_config, prompts)
    plan.suggestions = suggestions(model, resolutions, mode, batch, budget, layers_per_step)
    if with_targets:
        plan.targets = targets(model, max(prompts, 1), max(seeds, 1))
    return plan


def check_fits(model_patcher, config, bank_config: Optional[BankConfig], device, reserve: int = GiB,
               n_prompts: int = 0, device_memory: Optional[int] = None, dtype=torch.bfloat16) -> Plan:
    """The plan for distilling ``model_patcher`` with ``config`` (a DistillConfig) on ``device``;
    raises EDiTError with the table and the settings that would fit when it does not fit the
    device's free memory (CUDA, or ``device_memory`` bytes when given). On a CPU without
    ``device_memory`` nothing is refused. Builds the loaded model's own architecture, fake;
    measurements are cached per (architecture, bank, resolution, mode, batch) in the process."""
    from ...comfyui.architectures import model_config_of
    name = f"the loaded {type(model_patcher.model).__name__} model"
    plan = make_plan(model_config_of(model_patcher), name, config.resolutions, config.mode, config.batch_size,
                     device_budget(device, reserve, device_memory), bank_config, dtype, prompts=n_prompts,
                     seeds=len(config.seeds), layers_per_step=config.layers_per_step, distill_config=config)
    if plan.refuse and not plan.fits:
        raise EDiTError("this distillation does not fit the device's memory; nothing was started.\n" + plan.table())
    return plan


def plan_json(plan: Plan) -> Dict:
    return {"model": plan.model, "description": plan.description, "budget_bytes": plan.budget, "fits": plan.fits,
            "teacher_data": plan.teacher_data, "suggestions": plan.suggestions, "cost": plan.cost,
            "throughput": {"tflops": plan.throughput.tflops, "utilisation": plan.throughput.utilisation},
            "targets": [{"target": w, "measured": m, "pass": ok} for w, m, ok in plan.targets],
            "rows": [{"resolution": list(r.resolution), "mode": r.mode, "batch": r.batch,
                      "teacher_peak_bytes": r.teacher.peak, "step_peak_bytes": r.step.peak,
                      "step_resident_bytes": r.step.resident, "step_counted_bytes": r.step.counted,
                      "teacher_pass_flops": r.teacher.flops, "step_flops": r.step.flops,
                      "fits": r.fits(plan.budget)} for r in plan.rows]}
