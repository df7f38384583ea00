"""How much memory and disk a distillation needs, known before it starts.

    python -m edit_core.distill.plan --model sd35-medium --resolutions 512 1024 2048 \\
        --batch-size 1 --mode layerwise+e2e --device-memory 24GiB

The model's architecture is built at full depth and width through ComfyUI's own classes
under PyTorch's FakeTensorMode (shapes and dtypes, no data, nothing computed), patched with
an EDiT bank, and one teacher pass and one training step run on it while
``PeakTensorMemory`` counts the bytes of every live tensor. The peak of a step is what is
resident (weights, bank, AdamW state) plus the largest amount the step holds at once
(activations, captured layer tensors, gradients, optimizer temporaries).

Self-attention is measured with PyTorch's fused attention (ComfyUI's "pytorch" attention,
what it uses on CUDA): it never forms the N x N score matrix. Not counted: the CUDA context
and allocator fragmentation (``--reserve``, default 1 GiB, is kept free for them), kernel
workspaces. ``check_fits`` is what the node and the distill CLI call before any work.
"""
import argparse
import json
import re
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..bank import BankConfig, EDiTBank, EDiTError, new_bank_config
from ..util.cli import comma_list
from ..util.memory import PeakTensorMemory, storage_bytes

GiB = 2 ** 30
MiB = 2 ** 20
STEP_MODES = ("layerwise", "e2e")
# The targets for both families: (mode, resolution px) -> GiB, bf16, batch 1.
STEP_TARGETS = {("layerwise", 1024): 16.0, ("layerwise", 2048): 22.0, ("e2e", 1024): 20.0}
TEACHER_DATA_TARGET = 2 * MiB  # per image at 1024 px
FALLBACK_RESOLUTIONS = (1536, 1024, 768, 512)


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '16g', '8000MiB', '12.5' (GiB) -> bytes (GB and GiB both mean 2**30 here,
    as GPU makers' "24 GB" cards hold 24 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise EDiTError(f"{text!r} is not a memory size like 24GiB, 24GB or 8000MiB")
    unit = {"": GiB, "k": 2 ** 10, "m": MiB, "g": GiB, "t": 2 ** 40}[m.group(2)]
    return int(float(m.group(1)) * unit)


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def px(resolution: Tuple[int, int]) -> str:
    w, h = resolution
    return f"{w} px" if w == h else f"{w}x{h} px"


@dataclass(frozen=True)
class Measured:
    """Peak bytes of one pass: resident (held before it starts) + counted (its own tensors)."""
    resident: int
    counted: int

    @property
    def peak(self) -> int:
        return self.resident + self.counted


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

    @property
    def fits(self) -> bool:
        return all(r.fits(self.budget) for r in self.rows)

    def table(self) -> str:
        lines = [f"EDiT distillation plan: {self.model} ({self.description})", self.device_note]
        if self.teacher_data:
            td = self.teacher_data
            lines.append(f"teacher data on disk: {td['bytes'] / MiB:.1f} MiB for {td['images']} images "
                         f"({td['per_image'] / MiB:.2f} MiB per image)")
        lines += ["", "| resolution | mode | batch | teacher pass (GiB) | training step (GiB) | fits |",
                  "|---|---|---|---|---|---|"]
        for r in self.rows:
            mode = f"{r.mode} ({r.layers_per_step} layers)" if r.layers_per_step else r.mode
            lines.append(f"| {px(r.resolution)} | {mode} | {r.batch} | {gib(r.teacher.peak)} | {gib(r.step.peak)} | "
                         f"{'yes' if r.fits(self.budget) else 'NO'} |")
        if self.targets:
            lines += ["", "targets (bf16, batch 1):"]
            lines += [f"- {what}: {measured} {'(for information)' if ok is None else 'PASS' if ok else 'FAIL'}"
                      for what, measured, ok in self.targets]
        if self.suggestions:
            lines += ["", "settings that would fit:"] + [f"- {s}" for s in self.suggestions]
        return "\n".join(lines)


class PlanModel:
    """One architecture at full size: the EDiT-patched ModelPatcher, its bank and AdamW with its
    state (as from the second step on). ``fake``: fake tensors inside its own FakeTensorMode
    (nothing allocated); otherwise real tensors with seeded random weights on ``device`` (the
    cross-checks: a real CPU run, the GPU check)."""

    def __init__(self, model_config, bank_config: Optional[BankConfig], dtype, fake: bool = True, seed: int = 0,
                 device="cpu"):
        from torch._subclasses.fake_tensor import FakeTensorMode
        from ..comfyui.model import model_spec
        from ..comfyui.architectures import build_patcher
        from ..fixtures.tiny_models import randomize_
        from .losses import StudentLoss
        from .student import trainer_model

        self.dtype, self.device = dtype, torch.device(device)
        self.mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
        base = build_patcher(model_config, dtype, self.mode if fake else None)
        with self.mode, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if not fake:
                randomize_(base.model.diffusion_model, seed)
                base.model.to(device)
            base.model.requires_grad_(False)  # only the bank trains
            spec = model_spec(base)
            if bank_config is None:
                bank_config = new_bank_config(spec, spec.layers)
            self.bank = EDiTBank(bank_config)
            if not fake:
                self.bank.to(device)
            self.trainer = trainer_model(base, self.bank)  # EDiT + checkpointed blocks, as training runs
            self.trainer.model_options["transformer_options"]["optimized_attention_override"] = _fused_attention
            self.trainer.patch_model(load_weights=False)  # object patches only: the weights are already there
            self.loss_fn = StudentLoss(self.bank, self.trainer)
            self.optimizer = torch.optim.AdamW(self.bank.parameters(), lr=1e-3)
            for p in self.bank.parameters():
                p.grad = torch.zeros_like(p)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.spec = spec
        self.weights = storage_bytes(list(base.model.parameters()) + list(base.model.buffers()))
        self.bank_bytes = storage_bytes(self.bank.parameters())
        self.optimizer_bytes = storage_bytes(v for s in self.optimizer.state.values() for v in s.values())
        self.parameters = sum(p.numel() for p in base.model.diffusion_model.parameters())
        self.measured: Dict[Tuple, Measured] = {}  # see measure()

    def describe(self) -> str:
        s = self.spec
        return (f"{s.family}, depth {s.depth}, hidden {s.hidden_size}, {s.heads} heads, "
                f"{self.parameters / 1e9:.2f} B parameters, {str(self.dtype).replace('torch.', '')} weights "
                f"{gib(self.weights)} GiB; bank {len(self.bank.config.layers)} layers "
                f"{sum(p.numel() for p in self.bank.parameters()) / 1e6:.1f} M parameters, "
                f"with AdamW state {gib(self.bank_bytes + self.optimizer_bytes)} GiB")

    def _inputs(self, batch: int, resolution: Tuple[int, int]):
        from ..comfyui.architectures import example_inputs
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch)
            x, t, conds = example_inputs(self.trainer, batch, resolution, self.dtype)
        return x.to(self.device), t.to(self.device), {k: v.to(self.device) for k, v in conds.items()}

    def _count(self, fn) -> int:
        with self.mode, _pixart_fused_attention(), PeakTensorMemory() as counter:
            fn()
        return counter.peak

    def teacher_pass(self, resolution: Tuple[int, int]) -> Measured:
        """One sampler call of the teacher while generating teacher data: one image at a time
        (trajectories.generate), CFG's cond and uncond rows together."""
        from ..comfyui.patcher import TEACHER, call_model

        def run():
            x, t, conds = self._inputs(2, resolution)
            with torch.no_grad():
                call_model(self.trainer, x, t, conds, TEACHER, _discard)
        return Measured(self.weights + self.bank_bytes, self._count(run))

    def step(self, examples, mode: str, layers=None) -> Dict[str, float]:
        """One optimiser step as the distillation takes it (train.py): the batch's examples
        ((x, t, conds), batch 1 each) one after the other through losses.train_example under
        bf16 autocast, gradients accumulated, then clipping and AdamW. Returns the last losses."""
        from .losses import Example, train_example
        self.optimizer.zero_grad(set_to_none=True)
        for x, t, conds in examples:
            with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                parts = train_example(self.loss_fn, Example(x, t, conds), mode, 1.0 / len(examples), layers)
        torch.nn.utils.clip_grad_norm_(self.bank.parameters(), 1.0)
        self.optimizer.step()
        return parts

    def training_step(self, batch: int, resolution: Tuple[int, int], mode: str, layers_per_step: int = 0) -> Measured:
        """``layers_per_step``: the last k layers (the teacher runs to the end: the worst case)."""
        layers = self.bank.config.layers[-layers_per_step:] if layers_per_step else None

        def run():
            self.step([self._inputs(1, resolution) for _ in range(batch)], mode, layers)
        return Measured(self.weights + self.bank_bytes + self.optimizer_bytes, self._count(run))


@contextmanager
def _pixart_fused_attention():
    """Core PixArt calls the attention function it imported and takes no override (its blocks
    get no transformer_options), so its teacher path would be measured with this CPU's
    choice; for the measurement only, it gets the fused attention ComfyUI picks on CUDA."""
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.ldm.pixart.blocks as pixart_blocks
    chosen = pixart_blocks.optimized_attention
    pixart_blocks.optimized_attention = comfy_attention.attention_pytorch
    try:
        yield
    finally:
        pixart_blocks.optimized_attention = chosen


def _fused_attention(func, *args, **kwargs):
    """``optimized_attention_override``: PyTorch's fused attention, as ComfyUI picks on CUDA."""
    import comfy.ldm.modules.attention as comfy_attention
    return comfy_attention.attention_pytorch(*args, **kwargs)


def _discard(name, grid, tensors):
    """A capture sink that keeps nothing: routes every layer through the EDiT patch's teacher path."""


@lru_cache(maxsize=4)
def fake_model(arch_key: str, bank_key: str, dtype_name: str) -> PlanModel:
    """Built once per (architecture, bank, dtype) in a process; measurements are cached on it too."""
    from ..comfyui.architectures import model_config_from_unet_config
    unet_config = json.loads(arch_key)
    bank_config = None if not bank_key else _bank_config_from_key(bank_key)
    return PlanModel(model_config_from_unet_config(unet_config, "the model"), bank_config, getattr(torch, dtype_name))


def _bank_key(config: Optional[BankConfig]) -> str:
    if config is None:
        return ""
    return json.dumps({"family": config.family, "hidden_size": config.hidden_size, "heads": config.heads,
                       "depth": config.depth, "layers": list(config.layers), **config.hparams()}, sort_keys=True)


def _bank_config_from_key(key: str) -> BankConfig:
    d = json.loads(key)
    d["layers"] = tuple(d["layers"])
    return BankConfig(**d)


def _arch_key(model_config) -> str:
    unet_config = {k: v for k, v in model_config.unet_config.items() if k not in ("dtype", "device", "operations")}
    return json.dumps(unet_config, sort_keys=True, default=str)


def measure(model: PlanModel, what: str, batch: int, resolution: Tuple[int, int], layers_per_step: int = 0) -> Measured:
    """``what``: "teacher", "layerwise" or "e2e"; cached per model, pass, batch, resolution and layer count."""
    if layers_per_step >= len(model.bank.config.layers) or what == "teacher":
        layers_per_step = 0
    key = (what, batch, tuple(resolution), layers_per_step)
    if key not in model.measured:
        if what == "teacher":
            model.measured[key] = model.teacher_pass(resolution)
        else:
            model.measured[key] = model.training_step(batch, resolution, what, layers_per_step)
    return model.measured[key]


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
    """The issue's targets for this model: training steps measured at batch 1, and teacher
    data per image at 1024 px (conditioning shared by a prompt's seeds)."""
    out = []
    for (mode, res), limit in STEP_TARGETS.items():
        peak = measure(model, mode, 1, (res, res)).peak
        out.append((f"{'layer-wise' if mode == 'layerwise' else 'end-to-end'} step <= {limit:g} GiB @{res} px",
                    f"{gib(peak)} GiB", peak <= limit * GiB))
    per_image = teacher_data_estimate(model, [(1024, 1024)], prompts, seeds)["per_image"]
    from .teacher_data import image_bytes
    from .config import DistillConfig
    shard = image_bytes(model.trainer.model.latent_format.latent_channels, (1024, 1024), DistillConfig().sample_steps)
    out.append(("teacher data <= 2 MiB per image @1024 px: the image's own file", f"{shard / MiB:.3f} MiB ({shard} B)",
                shard <= TEACHER_DATA_TARGET))
    # The conditioning is kept once per prompt, not per image (the design): its share
    # per image is shown, not held against the per-image target.
    out.append((f"teacher data per image @1024 px with its share of the conditioning files "
                f"({prompts} prompts x {seeds} seeds, and the negative prompt)", f"{per_image / MiB:.2f} MiB", None))
    return out


def teacher_data_estimate(model: PlanModel, resolutions: Sequence[Tuple[int, int]], n_prompts: int, n_seeds: int,
                          config=None, prompt_tokens: Optional[int] = None) -> Dict:
    """Teacher data on disk, as the distillation writes it (cache.teacher_data_bytes): per
    image its final latent and call sigmas, per prompt (and the negative prompt) its
    conditioning, float32."""
    from ..comfyui.model import conditioning_dims
    from ..comfyui.architectures import PROMPT_TOKENS
    from .teacher_data import teacher_data_bytes
    from .config import DistillConfig
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
    import psutil
    available = psutil.virtual_memory().available
    return available, (f"{device}: {gib(available)} GiB RAM available; on a CPU the run is not refused "
                       "(the OS can swap), the table says what it will use"), False


def make_plan(model_config, name: str, resolutions: Sequence[Tuple[int, int]], mode: str, batch: int, budget_line,
              bank_config: Optional[BankConfig] = None, dtype=torch.bfloat16, prompts: int = 0, seeds: int = 0,
              layers_per_step: int = 0, with_targets: bool = False, distill_config=None) -> Plan:
    model = fake_model(_arch_key(model_config), _bank_key(bank_config), str(dtype).replace("torch.", ""))
    budget, note, refuse = budget_line
    resolutions = sorted(set(map(tuple, resolutions)), key=lambda r: (r[0] * r[1], r))
    rows = [row(model, r, m, batch, layers_per_step) for r in resolutions for m in modes_of(mode)]
    plan = Plan(name, model.describe(), budget, note, rows, refuse=refuse)
    if prompts and seeds:
        plan.teacher_data = teacher_data_estimate(model, resolutions, prompts, seeds, distill_config)
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
    from ..comfyui.architectures import model_config_of
    name = f"the loaded {type(model_patcher.model).__name__} model"
    plan = make_plan(model_config_of(model_patcher), name, config.resolutions, config.mode, config.batch_size,
                     device_budget(device, reserve, device_memory), bank_config, dtype, prompts=n_prompts,
                     seeds=len(config.seeds), layers_per_step=config.layers_per_step, distill_config=config)
    if plan.refuse and not plan.fits:
        raise EDiTError("this distillation does not fit the device's memory; nothing was started.\n" + plan.table())
    return plan


def build_parser():
    p = argparse.ArgumentParser(prog="python -m edit_core.distill.plan", description=__doc__, allow_abbrev=False,
                                formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=100))
    h = " (default: %(default)s)"
    p.add_argument("--model", default="sd35-medium",
                   help="sd35-medium, pixart-sigma, or a checkpoint file (only its header is read)" + h)
    p.add_argument("--resolutions", nargs="+", type=comma_list(int), default=[[512, 1024, 2048]],
                   help="square training resolutions in px, e.g. 512 1024 2048 or 512,1024" + h)
    p.add_argument("--batch-size", type=int, default=1,
                   help="examples per training step (they run one after another: memory hardly changes)" + h)
    p.add_argument("--mode", choices=("layerwise", "e2e", "layerwise+e2e"), default="layerwise+e2e", help=h.strip())
    p.add_argument("--layers-per-step", type=int, default=0, help="layers trained per step, 0 = all" + h)
    p.add_argument("--device-memory", default="24GiB", help="memory of the GPU to plan for" + h)
    p.add_argument("--reserve", default="1GiB", help="kept free for the CUDA context and fragmentation" + h)
    p.add_argument("--prompts", type=int, default=4, help="prompts, for the teacher-data size" + h)
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt, for the teacher-data size" + h)
    p.add_argument("--json", help="also write the plan as JSON to this file")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $EDIT_COMFYUI_DIR or the one this pack is in)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from ..comfyui.env import setup_comfy
    setup_comfy(args.comfyui)
    from ..comfyui.architectures import model_config_for
    resolutions = sorted({r for group in args.resolutions for r in group})
    if not resolutions or min(resolutions) < 64 or any(r % 16 for r in resolutions):
        raise EDiTError(f"--resolutions must be multiples of 16 px, at least 64, got {resolutions}")
    if args.batch_size < 1:
        raise EDiTError(f"--batch-size must be >= 1, got {args.batch_size}")
    device_memory, reserve = parse_bytes(args.device_memory), parse_bytes(args.reserve)
    budget_line = device_budget("cuda", reserve, device_memory)
    plan = make_plan(model_config_for(args.model), args.model, [(r, r) for r in resolutions], args.mode,
                     args.batch_size, budget_line, prompts=args.prompts, seeds=args.seeds,
                     layers_per_step=args.layers_per_step, with_targets=True)
    print(plan.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan_json(plan), f, indent=1)
    return 0 if plan.fits else 1


def plan_json(plan: Plan) -> Dict:
    return {"model": plan.model, "description": plan.description, "budget_bytes": plan.budget, "fits": plan.fits,
            "teacher_data": plan.teacher_data, "suggestions": plan.suggestions,
            "targets": [{"target": w, "measured": m, "pass": ok} for w, m, ok in plan.targets],
            "rows": [{"resolution": list(r.resolution), "mode": r.mode, "batch": r.batch,
                      "teacher_peak_bytes": r.teacher.peak, "step_peak_bytes": r.step.peak,
                      "step_resident_bytes": r.step.resident, "step_counted_bytes": r.step.counted,
                      "fits": r.fits(plan.budget)} for r in plan.rows]}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except EDiTError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
