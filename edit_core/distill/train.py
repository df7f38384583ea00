"""Distill an EDiT bank from its teacher: data, then a training loop you can read top to bottom.

    teacher images  ->  phases (resolution x layer-wise / end-to-end)  ->  AdamW steps  ->  bank

One loaded ComfyUI model serves as teacher (EDiT off) and student (EDiT on); only the bank
trains. Teacher data is each image's final latent; every step re-noises stored latents and
runs the teacher online (examples.py, losses.py). Under torchrun the teacher images are
split across ranks and the bank's gradients are averaged with one all-reduce per step
(torch.distributed; see docs/distillation.md for why not DistributedDataParallel). Rank 0
writes a checkpoint every ``checkpoint_every`` steps and on interruption; the same call with
the same arguments resumes from it and ends with the same bank as an uninterrupted run.
"""
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

import comfy.model_management
import comfy.samplers

from ..bank import EDiTBank, EDiTError, init_bank
from ..comfyui.model import model_spec
from .teacher_data import TeacherData, cond_bytes, image_bytes, image_jobs
from .checkpoint import load_checkpoint, save_checkpoint
from .config import DistillConfig, Phase, fingerprint
from .examples import batch, layer_subset, make_example
from .losses import StudentLoss, layer_errors, train_example
from .plan import check_fits
from .student import trainable_weights, trainer_model
from .trajectories import generate, needs_negative

EVAL_EXAMPLES = 8
CHECKPOINT = "checkpoint.safetensors"


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
    teacher_bytes: int = 0  # teacher data on disk

    def summary(self) -> Dict:
        """The training summary stored in the bank file's metadata."""
        last = self.history[-1] if self.history else {}
        return {"config": self.config.to_dict(), "steps": len(self.history), "final_loss": last.get("loss"),
                "layer_error_before": self.layer_errors_before, "layer_error_after": self.layer_errors_after,
                "seconds_teacher": round(self.seconds_teacher, 2), "seconds_train": round(self.seconds_train, 2)}


class NonFiniteError(EDiTError):
    pass


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world):
    if world > 1:
        dist.barrier()


def describe(obj):
    """A JSON-able description of patches, model sampling etc. with tensors summarised by
    shape and a strided sample of their values (cheap, and changes when they change)."""
    if torch.is_tensor(obj):
        flat = obj.detach().reshape(-1)
        return [list(obj.shape), str(obj.dtype), flat[:: max(1, flat.numel() // 4096)].float().cpu().tolist()]
    if isinstance(obj, dict):
        return {str(k): describe(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [describe(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "weights"):  # ComfyUI weight adapters (LoRA, LoHa, ...)
        return [type(obj).__name__, describe(obj.weights)]
    if callable(obj):
        return getattr(obj, "__qualname__", type(obj).__name__)
    return type(obj).__name__


def teacher_fingerprint(patcher, positive, negative, config: DistillConfig) -> str:
    """Identity of the teacher that actually runs: base weights, the clone's weight patches
    (LoRA and their strengths), the model sampling it samples with (shift, multiplier, its
    sigma table), the sampler's schedule and settings, and the conditioning."""
    sd = patcher.model.diffusion_model.state_dict()
    # A loaded clone's patches are baked into the shared module: read the originals back.
    prefix = "diffusion_model."
    sd.update({k[len(prefix):]: b.weight for k, b in patcher.backup.items() if k.startswith(prefix)})
    weights = [(k, list(v.shape), v.reshape(-1)[:16].float().cpu().tolist()) for k, v in sorted(sd.items())]
    ms = patcher.get_model_object("model_sampling")
    sampling = [type(ms).__name__, {k: describe(getattr(ms, k)) for k in ("shift", "multiplier") if hasattr(ms, k)},
                describe(ms.sigmas), describe(comfy.samplers.calculate_sigmas(ms, config.scheduler, config.sample_steps))]
    return fingerprint([config.data_fingerprint(), weights, describe(patcher.patches), sampling,
                        describe(positive), describe(negative)])


def trainable_copy(bank: EDiTBank, device) -> EDiTBank:
    """A fresh bank with the given weights: fresh (non-inference) tensors autograd can train."""
    with torch.inference_mode(False):
        fresh = EDiTBank(bank.config)
        fresh.load_state_dict(bank.state_dict())
        return fresh.to(device).requires_grad_(True)


def learning_rate(config: DistillConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    progress = step / max(1, config.train_steps - 1)
    return config.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def task_inputs(trainer, latents, step: int, conds, seed: int, device):
    """A task-loss example: a user latent noised to a step-seeded sigma."""
    g = torch.Generator().manual_seed(seed * 7919 + step)
    ms = trainer.get_model_object("model_sampling")
    x0 = trainer.model.process_latent_in(latents[step % latents.shape[0]].unsqueeze(0)).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    u = float(torch.rand((), generator=g)) * 0.98 + 0.01
    sigma = torch.tensor([ms.percent_to_sigma(u)], device=device)
    return x0, noise, sigma, conds


def check_work_dir(work_dir: Path, need_bytes: int):
    """The work folder exists, is writable and has room for ``need_bytes``: EDiTError if not."""
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        probe = work_dir / f".write-test-{os.getpid()}"  # every rank probes
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise EDiTError(f"the distillation work folder {work_dir} is not writable ({e.strerror or e}): "
                        f"pick another work folder")
    free = shutil.disk_usage(work_dir).free
    if free < need_bytes:
        raise EDiTError(f"the distillation work folder {work_dir} has {free / 2**20:.1f} MiB free, the teacher data "
                        f"and checkpoints need {need_bytes / 2**20:.1f} MiB: free space or pick another work folder")


def _sum_grads_over_ranks(params):
    """Each rank weighted its examples by 1 / global batch: the sum over ranks is the global
    batch's mean gradient. One flat all-reduce per step (the bank is small)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def distill(model, positive: List, negative, config: DistillConfig, work_dir, bank: Optional[EDiTBank] = None,
            latents: Optional[torch.Tensor] = None, on_progress: Optional[Callable[[Dict], None]] = None,
            device_memory: Optional[int] = None) -> DistillResult:
    """Distill ``bank`` (default: an untrained bank for all layers) from ``model``.

    positive: one ComfyUI CONDITIONING per prompt; negative: the CONDITIONING for CFG's
    uncond rows. latents: optional user latents (B, C, h, w) for the task loss.
    on_progress(event) gets {"stage": "teacher"|"train", "step", "total", "loss"?}; raising
    in it (e.g. ComfyUI's interrupt) stops the run after a checkpoint is written.
    device_memory: bytes to plan for; by default a CUDA device's own memory, and no memory
    check on a CPU (see edit_core.distill.plan.check_fits).
    """
    # ComfyUI runs nodes under inference_mode, whose tensors autograd and AdamW cannot use:
    # everything made here (bank, optimiser state, examples) must be normal tensors.
    with torch.inference_mode(False):
        return _distill(model, positive, negative, config, Path(work_dir), bank, latents, on_progress or (lambda e: None),
                        device_memory)


@dataclass
class Run:
    """What a run is, settled before any work: its place on disk and the teacher data it uses."""
    rank: int
    world: int
    device: torch.device
    train_dtype: torch.dtype
    start_bank: EDiTBank
    run_fp: str
    run_dir: Path
    data: TeacherData
    jobs: List

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / CHECKPOINT


@dataclass
class Student:
    """The training objects of a run: only the bank trains; the model is teacher and student."""
    bank: EDiTBank
    trainer: object
    loss_fn: StudentLoss
    params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    phases: List[Phase]
    pools: Dict
    autocast: object
    example: Callable


def _distill(model, positive, negative, config, work_dir, bank, latents, progress, device_memory) -> DistillResult:
    """plan (and refusals) -> teacher data -> the student -> resume or start -> the step loop -> finish."""
    run = prepare_run(model, positive, negative, config, work_dir, bank, latents, device_memory)
    train_bank = trainable_copy(run.start_bank, run.device)
    trainer = trainer_model(model, train_bank)
    seconds_teacher = teacher_data(run, trainer, positive, negative, config, progress)
    frozen = [(p, p.requires_grad) for p in model.model.parameters()]
    student = make_student(run, model, trainer, train_bank, config, frozen)
    top = student.pools[student.phases[-1].resolution]
    eval_examples = [student.example(top[i % len(top)], config.train_steps, i) for i in range(EVAL_EXAMPLES)]
    result = DistillResult(train_bank, config, work_dir=run.run_dir, seconds_teacher=seconds_teacher,
                           teacher_bytes=run.data.bytes_on_disk())
    step = resume_or_start(run, student, result, eval_examples)
    train_loop(run, student, result, config, step, latents, progress, frozen)
    with student.autocast:
        result.layer_errors_after = layer_errors(student.loss_fn, eval_examples)
    train_bank.requires_grad_(False)
    train_bank.config = replace(train_bank.config, training=result.summary())
    return result


def prepare_run(model, positive, negative, config, work_dir, bank, latents, device_memory) -> Run:
    """The run's identity and folders; refuses, before any work, a batch the processes cannot
    split, a run that will not fit the device (the plan's table and the settings that would
    fit, measured on the model's architecture, fake) and a work folder without room."""
    rank, world = _rank_world()
    if config.batch_size % world:
        raise EDiTError(f"batch_size {config.batch_size} must be a multiple of the number of processes ({world})")
    device = model.load_device
    train_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    start_bank = bank if bank is not None else init_bank(model_spec(model), seed=config.seed)
    data_fp = teacher_fingerprint(model, positive, negative, config)
    # The bank's hyper-parameters too: two designs can have the same tensors (cf_input,
    # local_placement) and must not share a run.
    run_fp = fingerprint([data_fp, config.to_dict(), describe(start_bank.tensors()), list(start_bank.config.layers),
                          describe(latents) if latents is not None else None, start_bank.config.hparams()])
    run_dir = work_dir / f"run-{run_fp}"
    if torch.device(device).type == "cuda" or device_memory is not None:
        check_fits(model, config, start_bank.config, device, n_prompts=len(positive), device_memory=device_memory)
    data = TeacherData(work_dir / f"teacher-{data_fp}")
    jobs = image_jobs(config.resolutions, len(positive), config.seeds)
    run = Run(rank, world, device, train_dtype, start_bank, run_fp, run_dir, data, jobs)
    check_work_dir(run_dir, disk_needed(run, model, positive, negative, config))
    return run


def disk_needed(run: Run, model, positive, negative, config) -> int:
    """Bytes of the teacher images not on disk yet, the conditioning and the checkpoints."""
    channels = model.get_model_object("latent_format").latent_channels
    missing = [j for j in run.jobs if not run.data.has(j, needs_negative(config))]
    cond_size = max((cond_bytes({k: v for k, v in c[0][1].items() if torch.is_tensor(v)}) + c[0][0].numel() * 4
                     for c in list(positive) + [negative]), default=0)
    bank_bytes = sum(v.numel() * 4 for v in run.start_bank.tensors().values())
    return (sum(image_bytes(channels, j.resolution, config.sample_steps) for j in missing)
            + (len(positive) + 1) * cond_size + 8 * bank_bytes)


def teacher_data(run: Run, trainer, positive, negative, config, progress) -> float:
    """The teacher images not on disk yet, one per shard, split over ranks (reused across
    runs); returns the seconds it took."""
    t0 = time.perf_counter()
    calls = [0]
    mine = [j for i, j in enumerate(run.jobs)
            if i % run.world == run.rank and not run.data.has(j, needs_negative(config))]
    total_calls = len(mine) * config.sample_steps * (2 if needs_negative(config) else 1)

    def teacher_progress():
        calls[0] += 1
        progress({"stage": "teacher", "step": min(calls[0], total_calls), "total": total_calls})

    generate(trainer, positive, negative, run.jobs, run.data, config, run.rank, run.world, teacher_progress)
    _barrier(run.world)
    return time.perf_counter() - t0


def make_student(run: Run, model, trainer, train_bank, config, frozen) -> Student:
    """Freezes the model (``frozen``: its parameters and their requires_grad flags, restored when
    training ends), loads it with its weights as normal tensors, and builds the optimiser, the
    phases' example pools and the example maker."""
    for p, _ in frozen:
        p.requires_grad_(False)
    comfy.model_management.load_models_gpu([trainer], force_full_load=True)
    trainable_weights(model.model)
    loss_fn = StudentLoss(train_bank, trainer, config.feature_weight, config.output_weight, config.task_weight)
    params = list(train_bank.parameters())
    if run.world > 1:
        for p in params:
            dist.broadcast(p.data, 0)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    phases: List[Phase] = config.phases()
    pools = {res: [j for j in run.jobs if j.resolution == tuple(res)] for res in {p.resolution for p in phases}}
    use_negative = needs_negative(config)

    def example(job, step, slot):
        return make_example(trainer, run.data, job, config.seed, step, slot, run.device, run.train_dtype,
                            use_negative)

    autocast = torch.autocast("cuda", dtype=run.train_dtype) if run.train_dtype != torch.float32 else nullcontext()
    return Student(train_bank, trainer, loss_fn, params, optimizer, phases, pools, autocast, example)


def resume_or_start(run: Run, student: Student, result: DistillResult, eval_examples) -> int:
    """The step to start at: the checkpoint's (bank, optimiser and history restored), or 0
    after measuring the untrained bank's layer errors."""
    if not run.checkpoint.is_file():
        with student.autocast:
            result.layer_errors_before = layer_errors(student.loss_fn, eval_examples)
        return 0
    info = load_checkpoint(run.checkpoint, student.bank, student.optimizer, run.run_fp)
    result.history, result.resumed_from = info["history"], info["step"]
    result.layer_errors_before, result.seconds_train = info["layer_errors_before"], info["seconds_train"]
    return info["step"]


def write_checkpoint(run: Run, student: Student, result: DistillResult, step: int):
    save_checkpoint(run.checkpoint, student.bank, student.optimizer, {
        "step": step, "history": result.history, "run": run.run_fp, "layer_errors_before": result.layer_errors_before,
        "seconds_train": result.seconds_train})


def train_loop(run: Run, student: Student, result: DistillResult, config, step: int, latents, progress, frozen):
    """The step loop, from ``step`` to the end. Rank 0 checkpoints every ``checkpoint_every``
    steps, on any interruption (an exception, e.g. from ``progress``) and at the end; a
    non-finite step writes nothing, so the last checkpoint is the last finite one. The model's
    requires_grad flags come back however the loop ends."""
    t_start = time.perf_counter() - result.seconds_train
    try:
        while step < config.train_steps:
            entry = train_step(run, student, config, step, latents)
            step += 1
            result.history.append(entry)
            result.seconds_train = time.perf_counter() - t_start
            if run.rank == 0 and step % config.checkpoint_every == 0:
                write_checkpoint(run, student, result, step)
            progress({"stage": "train", "step": step, "total": config.train_steps, "loss": entry["loss"],
                      "mode": entry["mode"]})
    except NonFiniteError:
        raise
    except BaseException:
        if run.rank == 0:
            write_checkpoint(run, student, result, step)
        raise
    finally:
        for p, flag in frozen:
            with torch.inference_mode(p.is_inference()):  # inference tensors may only get it back there
                p.requires_grad_(flag)
    if run.rank == 0:
        write_checkpoint(run, student, result, step)
    _barrier(run.world)


def train_step(run: Run, student: Student, config, step: int, latents) -> Dict:
    """One optimiser step (this rank's share of the batch, gradients summed over ranks); its
    history entry. NonFiniteError, before the update, when the loss or gradient norm is not finite."""
    phase_index, phase = next((i, p) for i, p in enumerate(student.phases) if p.start <= step < p.start + p.steps)
    lr = learning_rate(config, step)
    for group in student.optimizer.param_groups:
        group["lr"] = lr
    picked = batch(student.pools[phase.resolution], phase_index, step - phase.start, config.batch_size, config.seed)
    layers = layer_subset(student.bank.config.layers, config.layers_per_step, config.seed, step)
    student.optimizer.zero_grad(set_to_none=True)
    step_parts: Dict[str, float] = {}
    slots = list(range(run.rank, len(picked), run.world))
    for slot in slots:
        with student.autocast:
            parts = train_example(student.loss_fn, student.example(picked[slot], step, slot), phase.mode,
                                  1.0 / len(picked), layers)
        for k, v in parts.items():
            step_parts[k] = step_parts.get(k, 0.0) + v / len(slots)
    if latents is not None and phase.mode == "e2e" and config.task_weight > 0:
        # Every rank computes the same task example: each takes 1 / world of it.
        task = task_inputs(student.trainer, latents, step, student.example(picked[0], step, 0).conds, config.seed,
                           run.device)
        with student.autocast:
            step_parts["task"] = float(student.loss_fn.task(*task, weight=1.0 / run.world))
        step_parts["loss"] += config.task_weight * step_parts["task"]
    if run.world > 1:
        _sum_grads_over_ranks(student.params)
    norm = torch.nn.utils.clip_grad_norm_(student.params, config.grad_clip)
    loss_value = step_parts["loss"]
    if not math.isfinite(loss_value) or not torch.isfinite(norm):
        what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {float(norm)}"
        raise NonFiniteError(
            f"distillation stopped at step {step + 1}: the {what} is not finite. Likely cause: the learning "
            f"rate ({config.lr}) is too high, or the teacher's CFG ({config.cfg}) or the model gives "
            f"non-finite outputs. No bank was written; the last finite checkpoint is kept in {run.run_dir}")
    student.optimizer.step()
    return {"step": step + 1, "mode": phase.mode, "resolution": list(phase.resolution), "lr": lr,
            **{("loss" if k == "loss" else f"loss.{k}"): v for k, v in step_parts.items()}}
