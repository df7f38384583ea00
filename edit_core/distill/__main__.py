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

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm

from ..bank import init_bank, load_bank, save_bank, select_layers
from ..bank import options as bank_options
from ..comfyui.env import add_comfyui_flag, setup_comfy
from ..errors import EDiTError
from ..util.cli import HelpFormatter, read_prompt_file
from ..util.settings import add_flags, values_from
from .config import DATA, SETTINGS, TRAINING, DistillConfig
from .plan import parse_bytes


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
    s = p.add_argument_group("student design of an untrained bank (stored in the bank; see docs/design.md)",
                             "The defaults are the design the fidelity study picked (docs/fidelity.md); the original "
                             f"design: {bank_options.ORIGINAL_DESIGN_FLAGS}.")
    add_flags({bank_options.MODEL: g, bank_options.DESIGN: s}, (bank_options.LAYERS, *bank_options.SETTINGS))
    g.add_argument("--latents", help="safetensors file with a 'latent' tensor (B, C, h, w) for the task loss")
    add_comfyui_flag(g)
    groups = {title: p.add_argument_group(title) for title in (DATA, TRAINING)}
    add_flags(groups, SETTINGS)
    t = groups[TRAINING]
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
    work = work_dir_of(args)
    why = writable_file(work / "probe")
    if why:
        return f"work folder {work} cannot be written: {why}; give --work-dir"
    return None


def work_dir_of(args) -> Path:
    out = Path(args.output)
    return Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".work")


def read_settings(args):
    """The bank options, the DistillConfig and the device memory from the flags; a bad value
    is an EDiTError (a ValueError), said before anything loads."""
    options = bank_options.options_from_flags(args)
    config = DistillConfig(**values_from(SETTINGS, vars(args)))
    device_memory = parse_bytes(args.device_memory) if args.device_memory else None
    return options, config, device_memory


def start_processes(args):
    """ComfyUI on this process's device, and the process group under torchrun: (rank, world)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # ComfyUI takes the current device
    setup_comfy(args.comfyui)
    if world > 1:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return rank, world


def catch_stop_signals() -> list:
    """Ctrl-C and SIGTERM ask to stop at the next step boundary, so the checkpoint holds a whole
    optimiser step; a second signal stops at once. The returned list is non-empty once asked."""
    stop = []

    def request_stop(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop


def read_prompts(args):
    prompts = list(args.prompt)
    if args.prompts:
        prompts += read_prompt_file(args.prompts, EDiTError)
    if not prompts:
        raise EDiTError("no prompts: give --prompts FILE or --prompt TEXT")
    return prompts


def load_model(args):
    """The model, its ModelSpec and the function that encodes a prompt into its CONDITIONING."""
    import comfy.sd
    from ..comfyui.model import conditioning_dims, model_spec
    from ..fixtures.tiny_models import random_conditioning
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(args.model, output_vae=False, output_clip=True)
    spec = model_spec(model)
    if args.random_conditioning:
        dims = conditioning_dims(model)
        return model, spec, lambda text: random_conditioning(text, args.seed, args.random_conditioning, *dims)
    if args.text_encoders:
        clip_type = comfy.sd.CLIPType[(args.clip_type or spec.family).upper()]
        clip = comfy.sd.load_clip(args.text_encoders, clip_type=clip_type)
    if clip is None:
        raise EDiTError(f"{args.model} has no text encoders: give --text-encoders (or --random-conditioning)")
    return model, spec, lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))


def start_bank(args, spec, options):
    """--init-bank, or an untrained bank of --layers with the design options."""
    if args.init_bank:
        return load_bank(args.init_bank)
    return init_bank(spec, select_layers(spec.layers, args.layers), seed=args.seed, **options)


def progress_bars(stop: list, rank: int):
    """distill's on_progress: raises KeyboardInterrupt once a stop was asked (distill then
    checkpoints); rank 0 draws one bar per stage. Returns (on_progress, the bars)."""
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

    return progress, bars


def write_outputs(result, out: Path):
    """The bank, its report and charts, and the report on stdout."""
    from .report import layer_error_chart, loss_curve, report_text
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


def run(args, options, config, device_memory, rank: int, stop: list):
    """Load, distill, and (rank 0) write the outputs."""
    from .train import distill
    prompts = read_prompts(args)
    model, spec, encode = load_model(args)
    positive = [encode(p) for p in prompts]
    negative = encode(args.negative)
    bank = start_bank(args, spec, options)
    latents = load_file(args.latents)["latent"] if args.latents else None
    progress, bars = progress_bars(stop, rank)
    result = distill(model, positive, negative, config, work_dir_of(args), bank=bank, latents=latents,
                     on_progress=progress, device_memory=device_memory)
    for bar in bars.values():
        bar.close()
    if rank == 0:
        write_outputs(result, Path(args.output))


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        options, config, device_memory = read_settings(args)
    except ValueError as e:  # EDiTError: a bad value, said before anything loads
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = check_files(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    rank, world = start_processes(args)
    stop = catch_stop_signals()
    try:
        run(args, options, config, device_memory, rank, stop)
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
