"""The measuring harness: one architecture at full size under FakeTensorMode (or real, for
the cross-checks), patched with a bank, and the peak bytes of a teacher pass or a training
step counted by ``PeakTensorMemory``, their floating-point operations by PyTorch's
``FlopCounterMode`` (matrix products and attention, which are nearly all of the work)."""
import json
import re
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional, Tuple

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from ...bank import BankConfig, EDiTBank, new_bank_config
from ...errors import EDiTError
from ...util.memory import PeakTensorMemory, storage_bytes

GiB = 2 ** 30
MiB = 2 ** 20


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
    """Peak bytes of one pass: resident (held before it starts) + counted (its own tensors);
    and the floating-point operations it runs."""
    resident: int
    counted: int
    flops: int = 0

    @property
    def peak(self) -> int:
        return self.resident + self.counted


class PlanModel:
    """One architecture at full size: the EDiT-patched ModelPatcher, its bank and AdamW with its
    state (as from the second step on). ``fake``: fake tensors inside its own FakeTensorMode
    (nothing allocated); otherwise real tensors with seeded random weights on ``device`` (the
    cross-checks: a real CPU run, the GPU check)."""

    def __init__(self, model_config, bank_config: Optional[BankConfig], dtype, fake: bool = True, seed: int = 0,
                 device="cpu"):
        from ...comfyui.model import model_spec
        from ...comfyui.architectures import build_patcher
        from ...fixtures.tiny_models import randomize_
        from ..losses import StudentLoss
        from ..student import trainer_model

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
        from ...comfyui.architectures import example_inputs
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch)
            x, t, conds = example_inputs(self.trainer, batch, resolution, self.dtype)
        return x.to(self.device), t.to(self.device), {k: v.to(self.device) for k, v in conds.items()}

    def _count(self, fn, flops_fn=None, flops_times: int = 1) -> Tuple[int, int]:
        """(peak bytes of the tensors ``fn`` holds at once, floating-point operations of
        ``flops_fn`` (default ``fn``) times ``flops_times``), from two runs: counting operations
        keeps tensors alive across the checkpointed blocks, which would inflate the peak (6.3 ->
        13.1 GiB for SD3.5-Medium's end-to-end step)."""
        with self.mode, _pixart_fused_attention(), PeakTensorMemory() as counter:
            fn()
        with self.mode, _pixart_fused_attention(), FlopCounterMode(display=False) as flops:
            (flops_fn or fn)()
        return counter.peak, flops.get_total_flops() * flops_times

    def teacher_pass(self, resolution: Tuple[int, int]) -> Measured:
        """One sampler call of the teacher while generating teacher data: one image at a time
        (trajectories.generate), CFG's cond and uncond rows together."""
        from ...comfyui.patcher import TEACHER, call_model

        def run():
            x, t, conds = self._inputs(2, resolution)
            with torch.no_grad():
                call_model(self.trainer, x, t, conds, TEACHER, _discard)
        return Measured(self.weights + self.bank_bytes, *self._count(run))

    def step(self, examples, mode: str, layers=None) -> Dict[str, float]:
        """One optimiser step as the distillation takes it (train.py): the batch's examples
        ((x, t, conds), batch 1 each) one after the other through losses.train_example under
        bf16 autocast, gradients accumulated, then clipping and AdamW. Returns the last losses."""
        from ..losses import Example, train_example
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

        def run(examples=batch):
            self.step([self._inputs(1, resolution) for _ in range(examples)], mode, layers)
        # A batch's examples have one shape and run one after another, and the counter sees
        # only matrix products, convolutions and attention (not the optimiser's element-wise
        # work): a batch's operations are exactly the batch times one example's.
        return Measured(self.weights + self.bank_bytes + self.optimizer_bytes,
                        *self._count(run, lambda: run(1), batch))


def _pixart_fused_attention():
    """Core PixArt calls the attention function it imported and takes no override, so its
    teacher path would be measured with this CPU's choice; for the measurement only, it gets
    the fused attention ComfyUI picks on CUDA."""
    from ...comfyui.attention_function import PIXART_MODULES, SDPA, use_attention
    return use_attention(SDPA, PIXART_MODULES)


def _fused_attention(func, *args, **kwargs):
    """``optimized_attention_override``: PyTorch's fused attention, as ComfyUI picks on CUDA."""
    from ...comfyui.attention_function import SDPA
    return SDPA(*args, **kwargs)


def _discard(name, grid, tensors):
    """A capture sink that keeps nothing: routes every layer through the EDiT patch's teacher path."""


@lru_cache(maxsize=4)
def fake_model(arch_key: str, bank_key: str, dtype_name: str) -> PlanModel:
    """Built once per (architecture, bank, dtype) in a process; measurements are cached on it too."""
    from ...comfyui.architectures import model_config_from_unet_config
    unet_config = json.loads(arch_key)
    bank_config = None if not bank_key else bank_config_from_key(bank_key)
    return PlanModel(model_config_from_unet_config(unet_config, "the model"), bank_config, getattr(torch, dtype_name))


def bank_key(config: Optional[BankConfig]) -> str:
    if config is None:
        return ""
    return json.dumps({"family": config.family, "hidden_size": config.hidden_size, "heads": config.heads,
                       "depth": config.depth, "layers": list(config.layers), **config.hparams()}, sort_keys=True)


def bank_config_from_key(key: str) -> BankConfig:
    d = json.loads(key)
    d["layers"] = tuple(d["layers"])
    return BankConfig(**d)


def arch_key(model_config) -> str:
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
