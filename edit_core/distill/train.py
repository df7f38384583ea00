"""Distill an EDiT bank from its teacher: data, then a training loop you can read top to bottom.

    teacher data  ->  phases (resolution x layer-wise / end-to-end)  ->  AdamW steps  ->  bank

One loaded ComfyUI model serves as teacher (EDiT off) and student (EDiT on); only the bank
trains. Runs under torchrun use PyTorch DDP: teacher shards are split across ranks,
gradients are all-reduced, rank 0 writes checkpoints. A checkpoint (bank, optimiser, step)
is written every ``checkpoint_every`` steps and on interruption; the same call with the same
arguments resumes from it and ends with the same bank as an uninterrupted run.
"""
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import comfy.model_management

from ..bank import EDiTBank, init_bank
from ..comfy_model import model_spec
from ..patcher import apply_edit
from .cache import Job, Sample, TrajectoryCache
from .config import DistillConfig, Phase, fingerprint
from .losses import StudentLoss
from .trajectories import generate

EVAL_SAMPLES = 8


@dataclass
class DistillResult:
    bank: EDiTBank
    config: DistillConfig
    history: List[Dict] = field(default_factory=list)
    layer_errors_before: Dict[str, float] = field(default_factory=dict)
    layer_errors_after: Dict[str, float] = field(default_factory=dict)
    seconds_teacher: float = 0.0
    seconds_train: float = 0.0
    work_dir: Optional[Path] = None
    resumed_from: int = 0  # the checkpoint's step when the run resumed one

    def summary(self) -> Dict:
        """The training summary stored in the bank file's metadata."""
        last = self.history[-1] if self.history else {}
        return {"config": self.config.to_dict(), "steps": len(self.history), "final_loss": last.get("loss"),
                "layer_error_before": self.layer_errors_before, "layer_error_after": self.layer_errors_after,
                "seconds_teacher": round(self.seconds_teacher, 2), "seconds_train": round(self.seconds_train, 2)}


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world):
    if world > 1:
        dist.barrier()


def model_fingerprint(patcher) -> str:
    """Cheap identity of the teacher's weights: shapes and the first values of every tensor."""
    sd = patcher.model.diffusion_model.state_dict()
    return fingerprint([(k, list(v.shape), v.flatten()[:16].float().tolist()) for k, v in sorted(sd.items())])


def tensors_fingerprint(obj) -> str:
    if torch.is_tensor(obj):
        return fingerprint([list(obj.shape), obj.flatten()[:: max(1, obj.numel() // 4096)].float().tolist()])
    if isinstance(obj, dict):
        return fingerprint({k: tensors_fingerprint(v) for k, v in sorted(obj.items())})
    if isinstance(obj, (list, tuple)):
        return fingerprint([tensors_fingerprint(v) for v in obj])
    return fingerprint(obj)


def trainable_copy(bank: EDiTBank, device) -> EDiTBank:
    """A fresh bank with the given weights: fresh (non-inference) tensors autograd can train."""
    with torch.inference_mode(False):
        fresh = EDiTBank(bank.config)
        fresh.load_state_dict(bank.state_dict())
        return fresh.to(device).requires_grad_(True)


def batch(pool: List, phase_index: int, step_in_phase: int, size: int, seed: int) -> List:
    """The samples of one optimiser step: consecutive slices of per-epoch permutations seeded
    by (seed, phase, epoch), so the data position is a pure function of the step."""
    n, picked = len(pool), []
    epoch, offset = divmod(step_in_phase * size, n)
    while len(picked) < size:
        g = torch.Generator().manual_seed(seed * 1_000_003 + phase_index * 10_007 + epoch)
        picked += torch.randperm(n, generator=g)[offset:offset + size - len(picked)].tolist()
        epoch, offset = epoch + 1, 0
    return [pool[i] for i in picked]


def learning_rate(config: DistillConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    progress = step / max(1, config.train_steps - 1)
    return config.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def task_inputs(student, latents, step: int, conds, seed: int, device):
    """A task-loss example: a user latent noised to a step-seeded sigma."""
    g = torch.Generator().manual_seed(seed * 7919 + step)
    ms = student.get_model_object("model_sampling")
    x0 = student.model.process_latent_in(latents[step % latents.shape[0]].unsqueeze(0)).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    u = float(torch.rand((), generator=g)) * 0.98 + 0.01
    sigma = torch.tensor([ms.percent_to_sigma(u)], device=device)
    return x0, noise, sigma, conds


@torch.no_grad()
def layer_errors(loss: StudentLoss, refs, device, dtype) -> Dict[str, float]:
    """Each converted layer's relative error on the teacher's inputs, averaged over ``refs``."""
    totals: Dict[str, float] = {}
    for ref in refs:
        for name, v in loss.layer_losses(Sample(ref, device, dtype)).items():
            totals[name] = totals.get(name, 0.0) + float(v) / len(refs)
    return totals


def save_checkpoint(path: Path, state: Dict):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def distill(model, positive: List, negative, config: DistillConfig, work_dir, bank: Optional[EDiTBank] = None,
            latents: Optional[torch.Tensor] = None, on_progress: Optional[Callable[[Dict], None]] = None) -> DistillResult:
    """Distill ``bank`` (default: an untrained bank for all layers) from ``model``.

    positive: one ComfyUI CONDITIONING per prompt; negative: the CONDITIONING for CFG's
    uncond rows. latents: optional user latents (B, C, h, w) for the task loss.
    on_progress(event) gets {"stage": "teacher"|"train", "step", "total", "loss"?}; raising
    in it (e.g. ComfyUI's interrupt) stops the run after a checkpoint is written.
    """
    # ComfyUI runs nodes under inference_mode, whose tensors autograd and AdamW cannot use:
    # everything made here (bank, optimiser state, loaded samples) must be normal tensors.
    with torch.inference_mode(False):
        return _distill(model, positive, negative, config, Path(work_dir), bank, latents, on_progress or (lambda e: None))


def _distill(model, positive, negative, config, work_dir, bank, latents, progress) -> DistillResult:
    rank, world = _rank_world()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of the number of processes ({world})")
    device = model.load_device
    train_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    start_bank = bank if bank is not None else init_bank(model_spec(model), seed=config.seed)
    model_fp = model_fingerprint(model)
    data_fp = fingerprint([config.data_fingerprint(), model_fp, tensors_fingerprint([positive, negative])])
    run_fp = fingerprint([data_fp, config.to_dict(), tensors_fingerprint(start_bank.tensors()),
                          list(start_bank.config.layers), tensors_fingerprint(latents) if latents is not None else None])
    run_dir = work_dir / f"run-{run_fp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "checkpoint.pt"

    # 1. Teacher data: one shard per trajectory, split over ranks, reused across runs.
    train_bank = trainable_copy(start_bank, device)
    student = apply_edit(model, train_bank)
    jobs = [Job(tuple(res), p, seed) for res in config.resolutions for p in range(len(positive)) for seed in config.seeds]
    cache = TrajectoryCache(work_dir / f"teacher-{data_fp}")
    t0 = time.perf_counter()
    calls = [0]
    total_calls = sum(1 for j, job in enumerate(jobs) if j % world == rank and not cache.has(job)) * config.sample_steps

    def teacher_progress():
        calls[0] += 1
        progress({"stage": "teacher", "step": calls[0], "total": total_calls})

    generate(student, positive, negative, jobs, cache, config, rank, world, teacher_progress)
    _barrier(world)
    seconds_teacher = time.perf_counter() - t0

    # 2. The student: only the bank trains; DDP all-reduces its gradients.
    frozen = [(p, p.requires_grad) for p in model.model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    comfy.model_management.load_models_gpu([student], force_full_load=True)
    loss_fn = StudentLoss(train_bank, student, config.feature_weight, config.output_weight, config.task_weight)
    ddp = DistributedDataParallel(loss_fn) if world > 1 else loss_fn
    optimizer = torch.optim.AdamW(train_bank.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    phases: List[Phase] = config.phases()
    pools = {res: cache.samples(jobs, res) for res in {p.resolution for p in phases}}
    eval_refs = pools[phases[-1].resolution][:EVAL_SAMPLES]

    result = DistillResult(train_bank, config, work_dir=run_dir, seconds_teacher=seconds_teacher)
    step = 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        train_bank.load_state_dict(state["bank"])
        optimizer.load_state_dict(state["optimizer"])
        step, result.history = state["step"], state["history"]
        result.resumed_from = step
        result.layer_errors_before, result.seconds_train = state["layer_errors_before"], state["seconds_train"]
    else:
        result.layer_errors_before = layer_errors(loss_fn, eval_refs, device, train_dtype)

    def snapshot():
        return {"step": step, "bank": train_bank.state_dict(), "optimizer": optimizer.state_dict(),
                "history": result.history, "layer_errors_before": result.layer_errors_before,
                "seconds_train": result.seconds_train, "run": run_fp}

    # 3. The loop.
    t_start = time.perf_counter() - result.seconds_train
    autocast = torch.autocast("cuda", dtype=train_dtype) if train_dtype != torch.float32 else nullcontext()
    try:
        with torch.enable_grad():
            while step < config.train_steps:
                phase_index, phase = next((i, p) for i, p in enumerate(phases) if p.start <= step < p.start + p.steps)
                lr = learning_rate(config, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                refs = batch(pools[phase.resolution], phase_index, step - phase.start, config.batch_size, config.seed)
                mine = refs[rank::world]
                optimizer.zero_grad(set_to_none=True)
                step_loss, step_parts = 0.0, {}
                for j, ref in enumerate(mine):
                    sample = Sample(ref, device, train_dtype)
                    task = None
                    if latents is not None and phase.mode == "e2e":
                        task = task_inputs(student, latents, step, sample.conds(), config.seed, device)
                    sync = ddp.no_sync() if world > 1 and j < len(mine) - 1 else nullcontext()
                    with sync:
                        with autocast:
                            loss, parts = ddp(sample, phase.mode, task)
                        (loss / len(mine)).backward()
                    step_loss += float(loss.detach()) / len(mine)
                    for k, v in parts.items():
                        step_parts[k] = step_parts.get(k, 0.0) + float(v.detach()) / len(mine)
                torch.nn.utils.clip_grad_norm_(train_bank.parameters(), config.grad_clip)
                optimizer.step()
                step += 1
                result.history.append({"step": step, "mode": phase.mode, "resolution": list(phase.resolution),
                                       "lr": lr, "loss": step_loss, **{f"loss.{k}": v for k, v in step_parts.items()}})
                result.seconds_train = time.perf_counter() - t_start
                if rank == 0 and step % config.checkpoint_every == 0:
                    save_checkpoint(checkpoint, snapshot())
                progress({"stage": "train", "step": step, "total": config.train_steps, "loss": step_loss,
                          "mode": phase.mode})
    except BaseException:
        if rank == 0:
            save_checkpoint(checkpoint, snapshot())
        raise
    finally:
        for p, flag in frozen:
            with torch.inference_mode(p.is_inference()):  # inference tensors may only get it back there
                p.requires_grad_(flag)
    if rank == 0:
        save_checkpoint(checkpoint, snapshot())
    _barrier(world)

    result.layer_errors_after = layer_errors(loss_fn, eval_refs, device, train_dtype)
    train_bank.requires_grad_(False)
    train_bank.config = replace(train_bank.config, training=result.summary())
    return result
