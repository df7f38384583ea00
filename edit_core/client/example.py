"""The main job: an example workflow through a real ComfyUI server, EDiT on and off, timed.

    bash scripts/run_example.sh                       # built-in tiny models
    EDIT_MODELS_DIR=~/ComfyUI/models bash scripts/run_example.sh   # your SD3.5 Medium + bank

Starts a headless ComfyUI ($EDIT_COMFYUI_DIR, the one this pack sits in, or the host under
.host/) with this pack installed, then runs the batch CLI's A/B run. With no models folder it
writes the tiny random models and says so: their images are seeded noise and their timings
show that the machinery works, not EDiT's speed-up on a real model. A missing workflow or models folder,
or one lacking the workflow's files, is a one-line error before anything starts.
"""
import argparse
import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path

from ..comfyui.env import PACK
from ..util.cli import comma_list, flat
from .batch import make_jobs, parse_size, run_batch, summary
from .server import ComfyServer
from .tiny_workflow import graph_family, use_tiny_models
from .workflow import WorkflowError, load_graph, with_settings

WORKFLOWS = {"sd3": PACK / "workflows" / "api" / "sd35_medium_edit.json",
             "pixart": PACK / "workflows" / "api" / "pixart_sigma_edit.json"}
PROMPTS = ["a lighthouse on a rocky coast at sunset", "a red fox in fresh snow, morning light"]


def needed_files(graph) -> list:
    """(folder, file name) of every model file the workflow loads."""
    fields = {"CheckpointLoaderSimple": ("checkpoints", "ckpt_name"), "UNETLoader": ("diffusion_models", "unet_name"),
              "VAELoader": ("vae", "vae_name"), "CLIPLoader": ("text_encoders", "clip_name"),
              "EDiTLoader": ("edit", "edit_name")}
    out = []
    for node in graph.values():
        ct, inputs = node["class_type"], node["inputs"]
        if ct in fields:
            out.append((fields[ct][0], inputs[fields[ct][1]]))
        elif ct == "TripleCLIPLoader":
            out += [("text_encoders", inputs[f"clip_name{i}"]) for i in (1, 2, 3)]
    return out


def fail(message: str):
    """One line on stderr and exit status 2, before any work."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_models_folder(models: Path, graph, workflow: Path, family: str):
    """Refuse a models folder that is missing, or lacks what the workflow loads, naming the fix."""
    if not models.exists():
        fail(f"models folder {models} does not exist: set EDIT_MODELS_DIR (or --models) to your ComfyUI "
             "models folder (the one holding checkpoints/, text_encoders/, ...), or unset it to run on the "
             "built-in tiny models")
    if not models.is_dir():
        fail(f"models folder {models} is a file, not a folder: point EDIT_MODELS_DIR at your ComfyUI models folder")
    missing = [f"{folder}/{name}" for folder, name in needed_files(graph) if not (models / folder / name).is_file()]
    if missing:
        make_bank = BANK_HINTS.get(family, BANK_HINTS["any"]) if any(m.startswith("edit/") for m in missing) else ""
        fail(f"models folder {models} lacks what {workflow.name} loads: {', '.join(missing)}"
             f"{'; ' + make_bank if make_bank else ''}")


# How to make the EDiT bank a family's example loads.
BANK_HINTS = {
    "sd3": "make the EDiT bank with workflows/sd35_distill_edit.json or "
            "`bash scripts/edit.sh distill --model <sd3.5_medium.safetensors> --output <models>/edit/"
            "sd35_medium_edit.safetensors ...`",
    "pixart": "make the PixArt-Sigma EDiT bank with `bash scripts/edit.sh distill --model "
              "<PixArt-Sigma-XL-2-2K-MS.pth> --text-encoders <t5xxl_fp16.safetensors> --output "
              "<models>/edit/pixart_sigma_edit.safetensors ...` or the EDiT Distill node fed by a UNETLoader "
              "with PixArt-Sigma (then Save EDiT)",
    "any": "make the EDiT bank for your model with `bash scripts/edit.sh distill --model <your model> --output "
           "<models>/edit/<bank>.safetensors ...` or the EDiT Distill node",
}


def family_of(graph):
    try:
        return graph_family(graph)
    except WorkflowError:
        return "any"


def build_parser():
    p = argparse.ArgumentParser(prog="bash scripts/run_example.sh", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=os.environ.get("EDIT_MODELS_DIR"),
                   help="your ComfyUI models folder ($EDIT_MODELS_DIR; unset: the built-in tiny models)")
    p.add_argument("--family", choices=sorted(WORKFLOWS), default="sd3", help="which example workflow: SD3.5-Medium (sd3) or PixArt-Sigma")
    p.add_argument("--workflow", help="your own API-format workflow instead of the family's example "
                                      "(with Apply EDiT in it for the on/off comparison)")
    p.add_argument("--sizes", nargs="+", type=comma_list(parse_size), default=None,
                   help="WIDTH or WIDTHxHEIGHT, space- or comma-separated (unset: 512 1024 on the tiny models, "
                        "1024 2048 on real ones)")
    p.add_argument("--seeds", nargs="+", type=comma_list(int), default=[[0]],
                   help="sampler seeds, space- or comma-separated")
    p.add_argument("--out", default=None, help="folder for the server, images and results (unset: a temporary one)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    tiny = not args.models
    seeds = flat(args.seeds)
    sizes = flat(args.sizes) or [parse_size(s) for s in (("512", "1024") if tiny else ("1024", "2048"))]

    workflow = Path(args.workflow) if args.workflow else WORKFLOWS[args.family]
    if not workflow.is_file():
        fail(f"workflow {workflow} does not exist: give the path of an API-format workflow "
             "(ComfyUI: Workflow > Export (API)), e.g. workflows/api/sd35_medium_edit.json")
    try:
        graph = load_graph(workflow)
        if tiny:
            graph = use_tiny_models(graph)
        with_settings(graph, PROMPTS[0], seeds[0], sizes[0], True)  # every setting has a place
    except WorkflowError as e:
        fail(str(e) if str(workflow) in str(e) else f"{workflow}: {e}")
    if not tiny:
        models = Path(args.models).expanduser()
        check_models_folder(models, graph, workflow, family_of(graph))
        print(f"models: {models}")
    base = Path(args.out or tempfile.mkdtemp(prefix="edit_example_")).resolve()
    if tiny:
        quiet_audio_warnings()
        from ..comfyui.env import setup_comfy
        setup_comfy()
        from ..fixtures.tiny_models import write_tiny_models
        write_tiny_models(base / "models")
        print("No real checkpoint configured (EDIT_MODELS_DIR unset): running on the built-in TINY random models. "
              "Their images are seeded noise and their timings only show the machinery working; point "
              "EDIT_MODELS_DIR at your ComfyUI models folder for real SD3.5 Medium / PixArt-Sigma numbers.")
    jobs = make_jobs(PROMPTS, seeds, sizes, ab=True)
    print(f"{workflow.name}: {len(jobs)} runs (EDiT on and off); server and outputs in {base}")
    with ComfyServer(base, models=None if tiny else models) as server:
        print(f"ComfyUI at {server.url} (log {server.log_path})")
        results = asyncio.run(run_batch(graph, jobs, [server.url], base / "batch"))
    print(summary(results))
    ok = sum(r.status == "success" for r in results)
    print(f"{ok}/{len(results)} runs succeeded; images and results.jsonl in {base / 'batch'}")
    return 0 if ok == len(results) else 1


def quiet_audio_warnings():
    """Importing ComfyUI here (to write the tiny models) logs 'torchaudio missing, ... will be
    broken' for its audio models; the test host has no torchaudio (see README) and nothing
    here uses audio, so those lines are dropped from this process's console."""
    logging.getLogger().addFilter(lambda record: "torchaudio missing" not in record.getMessage())


if __name__ == "__main__":
    sys.exit(main())
