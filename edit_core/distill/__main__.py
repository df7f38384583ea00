"""python -m edit_core.distill: distill EDiT weights from a model file, without a server.

    python -m edit_core.distill --model sd3.5_medium.safetensors \\
        --text-encoders clip_g.safetensors clip_l.safetensors t5xxl_fp16.safetensors \\
        --prompts prompts.txt --output models/edit/sd35m_edit.safetensors

On several GPUs: ``torchrun --nproc-per-node N -m edit_core.distill ...`` (torch.distributed:
one gradient all-reduce per step; --batch-size must be a multiple of N). Interrupt with
Ctrl-C (or SIGTERM): at the end of the current step a checkpoint is written, and the same
command resumes. Missing input files, an unwritable --output or work folder and settings
that cannot train are refused before anything loads. Writes the bank, <output>.report.md,
<output>.loss.png and <output>.layers.png.
"""
import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

from ..bank import DEFAULT_DESIGN, LEGACY_HPARAMS, default_hparam
from .config import DistillConfig, parse_ints, parse_resolutions
from .plan import parse_bytes


# The flags that make the design of the banks made before DEFAULT_DESIGN.
LEGACY_FLAGS = " ".join(f"--{key.replace('_', '-')} {LEGACY_HPARAMS[key]}" for key in DEFAULT_DESIGN)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser():
    p = argparse.ArgumentParser(prog="python -m edit_core.distill", description=__doc__, formatter_class=HelpFormatter,
                                allow_abbrev=False)
    g = p.add_argument_group("model and prompts")
    g.add_argument("--model", required=True, help="checkpoint or diffusion-model file (SD3/SD3.5, PixArt-Sigma)")
    g.add_argument("--text-encoders", nargs="*", default=[], help="text encoder files (when not in the checkpoint)")
    g.add_argument("--clip-type", choices=["sd3", "pixart"], help="text encoder type (default: the model's family)")
    g.add_argument("--prompts", help="file with one prompt per line")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--negative", default="", help="negative prompt for CFG")
    g.add_argument("--random-conditioning", type=int, metavar="TOKENS",
                   help="no text encoder: seeded random conditioning of TOKENS tokens per prompt (testing)")
    g.add_argument("--output", required=True, help="the bank file to write (.safetensors)")
    g.add_argument("--init-bank", help="continue from this bank instead of an untrained one")
    g.add_argument("--layers", default="all", help="layers of an untrained bank: 'all' or e.g. '0-12'")
    g.add_argument("--reduction", type=int, default=default_hparam("reduction"),
                   help="ConvFusion reduction r of an untrained bank")
    g.add_argument("--eta-mode", choices=["learned", "ratio"], default=default_hparam("eta_mode"),
                   help="eta of an untrained bank")
    s = p.add_argument_group("student design of an untrained bank (stored in the bank; see docs/design.md)",
                             "The defaults are the design the fidelity study picked (docs/fidelity.md); banks made "
                             f"before it: {LEGACY_FLAGS}.")
    s.add_argument("--cf-kernel", type=int, default=default_hparam("cf_kernel"),
                   help="ConvFusion kernel size (odd); 0: no ConvFusion")
    s.add_argument("--sc-kernel", type=int, default=default_hparam("sc_kernel"), help="k/v compressor kernel size (odd)")
    s.add_argument("--sc-stride", type=int, choices=[1, 2], default=default_hparam("sc_stride"),
                   help="k/v compressor stride; 1 with --sc-kernel 1: no compression")
    s.add_argument("--local-kernel", type=int, default=default_hparam("local_kernel"),
                   help="local value branch kernel size (odd); 0: none")
    s.add_argument("--local-placement", choices=["inside", "outside"], default=default_hparam("local_placement"),
                   help="SD3: the local branch inside the eta-weighted term or added outside it (PixArt: the same)")
    s.add_argument("--cf-input", choices=["family", "residual", "modulated"], default="family",
                   help="what ConvFusion reads on SD3: the block's residual stream or the modulated attention input; "
                        "family: residual on SD3, modulated on PixArt (its only choice)")
    s.add_argument("--qkv-rank", type=int, default=default_hparam("qkv_rank"),
                   help="rank of a low-rank update of the converted layers' normalised image q/k/v; 0: none")
    g.add_argument("--latents", help="safetensors file with a 'latent' tensor (B, C, h, w) for the task loss")
    g.add_argument("--comfyui", help="ComfyUI folder (default: $EDIT_COMFYUI_DIR or the one this pack is in)")
    d = p.add_argument_group("teacher data")
    d.add_argument("--resolutions", nargs="+", default=["512"], help="e.g. 512 1024, 512,1024 or 768x512")
    d.add_argument("--seeds", nargs="+", default=["0"], help="noise seeds per prompt, e.g. 0 1 2 or 0,1,2")
    d.add_argument("--sampler", default="euler", help="ComfyUI sampler name")
    d.add_argument("--scheduler", default="simple", help="ComfyUI scheduler name")
    d.add_argument("--sample-steps", type=int, default=20, help="sampling steps of the teacher")
    d.add_argument("--cfg", type=float, default=4.0, help="CFG scale of the teacher")
    t = p.add_argument_group("training")
    t.add_argument("--train-steps", type=int, default=500, help="optimiser steps")
    t.add_argument("--batch-size", type=int, default=2, help="examples per step (all processes together)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    t.add_argument("--warmup-steps", type=int, default=20, help="linear warm-up steps")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    t.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    t.add_argument("--mode", choices=["layerwise+e2e", "layerwise", "e2e"], default="layerwise+e2e",
                   help="layer-wise, end-to-end, or layer-wise then end-to-end")
    t.add_argument("--layerwise-fraction", type=float, default=0.5, help="share of layer-wise steps in layerwise+e2e")
    t.add_argument("--layers-per-step", type=int, default=0,
                   help="train a random subset of this many layers per step (0: all; less memory end-to-end, "
                        "less time layer-wise)")
    t.add_argument("--feature-weight", type=float, default=1.0, help="weight of the per-layer feature losses")
    t.add_argument("--output-weight", type=float, default=1.0, help="weight of the end-to-end output loss")
    t.add_argument("--task-weight", type=float, default=0.0, help="weight of the task loss on --latents")
    t.add_argument("--seed", type=int, default=0, help="seed of the bank's init and of the examples")
    t.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    t.add_argument("--device-memory", help="plan for a device of this memory (e.g. 24GiB) and refuse a run that "
                   "would not fit, before any work (default: a CUDA device's own memory; no check on a CPU)")
    t.add_argument("--work-dir", help="teacher data and checkpoints (default: <output>.work)")
    return p


def writable_file(path: Path) -> Optional[str]:
    """Why ``path`` cannot be written (None if it can): the file or its nearest existing folder."""
    if path.is_dir():
        return "it is a folder"
    if path.exists():
        return None if os.access(path, os.W_OK) else "it is not writable"
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    return None if os.access(folder, os.W_OK | os.X_OK) else f"the folder {folder} is not writable"


def check_files(args) -> Optional[str]:
    """One-line reason the command cannot run, found before anything is loaded (or None)."""
    inputs = [("--model", args.model), ("--prompts", args.prompts), ("--init-bank", args.init_bank),
              ("--latents", args.latents)] + [("--text-encoders", f) for f in args.text_encoders]
    for flag, name in inputs:
        if name and not Path(name).is_file():
            return f"{flag} {name}: no such file"
    out = Path(args.output)
    why = writable_file(out)
    if why:
        return f"--output {out} cannot be written: {why}; pick another path"
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")
    why = writable_file(work / "probe")
    if why:
        return f"work folder {work} cannot be written: {why}; give --work-dir"
    return None


BANK_OPTIONS = ("reduction", "eta_mode", "cf_kernel", "sc_kernel", "sc_stride", "local_kernel", "local_placement",
                "cf_input", "qkv_rank")


def bank_options(args) -> dict:
    """init_bank's hyper-parameters from the command line (cf_input "family": left to the
    model's family); a value no bank could hold is an EDiTError, before anything loads."""
    from ..bank import EDiTError, hparam_problem
    options = {key: getattr(args, key) for key in BANK_OPTIONS}
    if options["cf_input"] == "family":
        del options["cf_input"]
    for key, value in options.items():
        problem = hparam_problem(key, value)
        if problem:
            raise EDiTError(f"--{key.replace('_', '-')} {value}: must be {problem}")
    return options


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        options = bank_options(args)
        resolutions, seeds = parse_resolutions(args.resolutions), parse_ints(args.seeds)
        config = DistillConfig(
            resolutions=resolutions, seeds=seeds, sampler=args.sampler, scheduler=args.scheduler,
            sample_steps=args.sample_steps, cfg=args.cfg, train_steps=args.train_steps, batch_size=args.batch_size,
            lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
            mode=args.mode, layerwise_fraction=args.layerwise_fraction, feature_weight=args.feature_weight,
            output_weight=args.output_weight, task_weight=args.task_weight, seed=args.seed,
            checkpoint_every=args.checkpoint_every, layers_per_step=args.layers_per_step)
        device_memory = parse_bytes(args.device_memory) if args.device_memory else None
    except ValueError as e:  # EDiTError: a bad value, said before anything loads
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = check_files(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    import torch
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # ComfyUI takes the current device
    from ..comfyui.env import setup_comfy
    setup_comfy(args.comfyui)
    import torch.distributed as dist
    import comfy.sd
    from safetensors.torch import load_file
    from tqdm import tqdm

    from ..bank import EDiTError, init_bank, load_bank, save_bank, select_layers
    from ..comfyui.model import conditioning_dims, model_spec
    from ..fixtures.tiny_models import random_conditioning
    from .report import layer_error_chart, loss_curve, report_text
    from .train import distill

    if world > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    stop = []

    def request_stop(signum, frame):
        # Stop at the next step boundary, so the checkpoint holds a whole optimiser step;
        # a second signal stops at once.
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    try:
        prompts = list(args.prompt)
        if args.prompts:
            prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise EDiTError("no prompts: give --prompts FILE or --prompt TEXT")
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(args.model, output_vae=False, output_clip=True)
        spec = model_spec(model)
        if args.random_conditioning:
            dims = conditioning_dims(model)
            encode = lambda text: random_conditioning(text, args.seed, args.random_conditioning, *dims)  # noqa: E731
        else:
            if args.text_encoders:
                clip_type = comfy.sd.CLIPType[(args.clip_type or spec.family).upper()]
                clip = comfy.sd.load_clip(args.text_encoders, clip_type=clip_type)
            if clip is None:
                raise EDiTError(f"{args.model} has no text encoders: give --text-encoders (or --random-conditioning)")
            encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))  # noqa: E731
        positive = [encode(p) for p in prompts]
        negative = encode(args.negative)
        if args.init_bank:
            bank = load_bank(args.init_bank)
        else:
            bank = init_bank(spec, select_layers(spec.layers, args.layers), seed=args.seed, **options)
        latents = load_file(args.latents)["latent"] if args.latents else None
        out = Path(args.output)
        work_dir = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")

        bars = {}

        def progress(event):
            if stop:
                raise KeyboardInterrupt
            if rank:
                return
            bar = bars.get(event["stage"])
            if bar is None:
                desc = "teacher trajectories" if event["stage"] == "teacher" else "distilling"
                bar = bars[event["stage"]] = tqdm(total=event["total"], desc=desc, initial=event["step"] - 1)
            bar.update(event["step"] - bar.n)
            if "loss" in event:
                bar.set_postfix(loss=f"{event['loss']:.4f}", mode=event["mode"])

        result = distill(model, positive, negative, config, work_dir, bank=bank, latents=latents, on_progress=progress,
                         device_memory=device_memory)
        for bar in bars.values():
            bar.close()
        if rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            save_bank(result.bank, out)
            text = report_text(result)
            Path(str(out) + ".report.md").write_text(text + "\n")
            loss_curve(result).save(str(out) + ".loss.png")
            layer_error_chart(result).save(str(out) + ".layers.png")
            print(text)
            print(f"\nsaved {out} (+ .report.md, .loss.png, .layers.png); work dir {result.work_dir}")
            print(json.dumps({"layer_error_before": result.layer_errors_before,
                              "layer_error_after": result.layer_errors_after}))
    except EDiTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: checkpoint written; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
