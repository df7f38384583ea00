"""The main job: an example workflow through a real ComfyUI server, EDiT on and off, timed.

    bash scripts/run_example.sh                       # built-in tiny models
    EDIT_MODELS_DIR=~/ComfyUI/models bash scripts/run_example.sh   # your SD3.5 Medium + bank

Starts a headless ComfyUI (the host under .host/, or $EDIT_COMFYUI_DIR) with this pack
installed, then runs the batch CLI's A/B run. With no models folder it writes the tiny
random models and says so: their images are noise and their timings show that the machinery
works, not EDiT's speed-up on a real model.
"""
import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from .batch import make_jobs, parse_size, run_batch, summary
from .host_server import PACK, ComfyServer
from .workflow import load_graph, use_tiny_models

WORKFLOWS = {"sd35": PACK / "workflows" / "api" / "sd35_medium_edit.json",
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


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m edit_core.example", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=os.environ.get("EDIT_MODELS_DIR"),
                   help="your ComfyUI models folder (default $EDIT_MODELS_DIR; unset: the built-in tiny models)")
    p.add_argument("--family", choices=sorted(WORKFLOWS), default="sd35")
    p.add_argument("--workflow", help="your own API-format workflow instead of the family's example "
                                      "(with Apply EDiT in it for the on/off comparison)")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=None,
                   help="default: 512 1024 on the tiny models, 1024 2048 on real ones")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", default=None, help="folder for the server, images and results (default: a temporary one)")
    args = p.parse_args(argv)

    workflow = Path(args.workflow) if args.workflow else WORKFLOWS[args.family]
    graph = load_graph(workflow)
    base = Path(args.out or tempfile.mkdtemp(prefix="edit_example_")).resolve()
    if args.models:
        missing = [f"{folder}/{name}" for folder, name in needed_files(graph)
                   if not (Path(args.models) / folder / name).is_file()]
        if missing:
            p.error(f"{args.models} lacks what {workflow.name} loads: {', '.join(missing)} "
                    "(make the EDiT bank with workflows/sd35_distill_edit.json or python -m edit_core.distill)")
        sizes = args.sizes or [parse_size("1024"), parse_size("2048")]
        print(f"models: {args.models}")
    else:
        from .comfy_env import setup_comfy
        setup_comfy()
        from .tiny_models import write_tiny_models
        write_tiny_models(base / "models")
        graph = use_tiny_models(graph)
        sizes = args.sizes or [parse_size("512"), parse_size("1024")]
        print("No real checkpoint configured (EDIT_MODELS_DIR unset): running on the built-in TINY random models. "
              "Their images are noise and their timings only show the machinery working; point EDIT_MODELS_DIR "
              "at your ComfyUI models folder for real SD3.5 Medium / PixArt-Sigma numbers.")
    jobs = make_jobs(PROMPTS, args.seeds, sizes, ab=True)
    print(f"{workflow.name}: {len(jobs)} runs (EDiT on and off); server and outputs in {base}")
    with ComfyServer(base, models=args.models) as server:
        print(f"ComfyUI at {server.url} (log {server.log_path})")
        results = asyncio.run(run_batch(graph, jobs, [server.url], base / "batch"))
    print(summary(results))
    ok = sum(r.status == "success" for r in results)
    print(f"{ok}/{len(results)} runs succeeded; images and results.jsonl in {base / 'batch'}")
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
