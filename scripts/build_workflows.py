"""Writes the example workflows: workflows/api/NAME.json (API format, the source of truth
below), workflows/NAME.json (their UI-format twins, laid out for the editor and listed in
ComfyUI's template browser) and workflows/NAME.jpg (the browser's thumbnail: what the
workflow does, in a line, over a chart of our measured results). Node input orders come
from a real ComfyUI server's /object_info, started here with this pack installed.

    .host/venv/bin/python scripts/build_workflows.py
    .host/venv/bin/python scripts/build_workflows.py --thumbnails-only   # no server needed

ComfyUI 0.3.75 serves a pack's workflows/ folder at /api/workflow_templates/<pack>/, and the
frontend (1.32.9) shows a custom-node template as the file name over <name>.jpg: it reads no
other metadata, so the thumbnail carries the description.
"""
import argparse
import json
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edit_core.client.server import ComfyServer  # noqa: E402
from edit_core.client.ui_format import api_to_ui  # noqa: E402

SD35_CKPT = "sd3.5_medium.safetensors"
SD3_TEXT_ENCODERS = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")
PIXART_UNET = "PixArt-Sigma-XL-2-2K-MS.pth"
PROMPT = "a lighthouse on a rocky coast at sunset, waves crashing, highly detailed, 35mm photograph"
NEGATIVE = "blurry, lowres, watermark"
SIZE = 2048  # EDiT pays off at high resolution: 16k image tokens here


def node(class_type, title=None, **inputs):
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title or class_type}}


def sd35_loaders():
    return {
        "1": node("CheckpointLoaderSimple", "SD3.5 Medium", ckpt_name=SD35_CKPT),
        "2": node("TripleCLIPLoader", "SD3 text encoders", clip_name1=SD3_TEXT_ENCODERS[0],
                  clip_name2=SD3_TEXT_ENCODERS[1], clip_name3=SD3_TEXT_ENCODERS[2]),
        "3": node("CLIPTextEncode", "Positive", text=PROMPT, clip=["2", 0]),
        "4": node("CLIPTextEncode", "Negative", text=NEGATIVE, clip=["2", 0]),
        "5": node("ModelSamplingSD3", model=["1", 0], shift=3.0),
        "8": node("EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1),
    }


def apply_edit(model, bank):
    return node("ApplyEDiT", "Apply EDiT", model=model, edit_bank=bank, enabled=True, layers="all",
                start_percent=0.0, end_percent=1.0, min_tokens=0)


def sampler(model, title, steps=40, cfg=4.5, scheduler="sgm_uniform", latent=("8", 0)):
    return node("KSampler", title, model=model, seed=0, steps=steps, cfg=cfg, sampler_name="euler",
                scheduler=scheduler, positive=["3", 0], negative=["4", 0], latent_image=list(latent), denoise=1.0)


def sd35_medium_edit():
    g = sd35_loaders()
    g.update({
        "6": node("EDiTLoader", "EDiT Loader", edit_name="sd35_medium_edit.safetensors"),
        "7": apply_edit(["5", 0], ["6", 0]),
        "9": sampler(["7", 0], "KSampler (EDiT)"),
        "10": node("VAEDecode", samples=["9", 0], vae=["1", 2]),
        "11": node("SaveImage", images=["10", 0], filename_prefix="EDiT/sd35_medium_edit"),
    })
    return g


def pixart_sigma_edit():
    return {
        "1": node("UNETLoader", "PixArt-Sigma", unet_name=PIXART_UNET, weight_dtype="default"),
        "2": node("CLIPLoader", "T5-XXL (pixart)", clip_name=SD3_TEXT_ENCODERS[2], type="pixart", device="default"),
        "3": node("CLIPTextEncode", "Positive", text=PROMPT, clip=["2", 0]),
        "4": node("CLIPTextEncode", "Negative", text=NEGATIVE, clip=["2", 0]),
        "5": node("VAELoader", "SDXL VAE", vae_name="sdxl_vae.safetensors"),
        "6": node("EDiTLoader", "EDiT Loader", edit_name="pixart_sigma_edit.safetensors"),
        "7": apply_edit(["1", 0], ["6", 0]),
        "8": node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1),
        "9": sampler(["7", 0], "KSampler (EDiT)", steps=20, scheduler="normal"),
        "10": node("VAEDecode", samples=["9", 0], vae=["5", 0]),
        "11": node("SaveImage", images=["10", 0], filename_prefix="EDiT/pixart_sigma_edit"),
    }


def comparison(g, bank, prefix):
    """Original (left) and EDiT (right) from the same seed, stitched; and a speed report."""
    g.update({
        "7": apply_edit(["5", 0], bank),
        "9": sampler(["5", 0], "KSampler (original)"),
        "10": sampler(["7", 0], "KSampler (EDiT)"),
        "11": node("VAEDecode", "Decode original", samples=["9", 0], vae=["1", 2]),
        "12": node("VAEDecode", "Decode EDiT", samples=["10", 0], vae=["1", 2]),
        "13": node("ImageStitch", "Original | EDiT", image1=["11", 0], direction="right", match_image_size=True,
                   spacing_width=16, spacing_color="white", image2=["12", 0]),
        "14": node("SaveImage", images=["13", 0], filename_prefix=prefix),
    })
    return g


def sd35_original_vs_edit():
    g = sd35_loaders()
    g["6"] = node("EDiTLoader", "EDiT Loader", edit_name="sd35_medium_edit.safetensors")
    comparison(g, ["6", 0], "EDiT/sd35_original_vs_edit")
    g["15"] = node("EDiTSpeedTest", "EDiT Speed Test", model=["7", 0], width=SIZE, height=SIZE, batch_size=2,
                   prompt_tokens=154, repeats=3)
    g["16"] = node("PreviewImage", "Speed report", images=["15", 0])
    return g


def sd35_distill_edit():
    g = sd35_loaders()
    g["6"] = node("EDiTDistill", "EDiT Distill", model=["5", 0], clip=["2", 0], prompts="\n".join([
        PROMPT, "a portrait of an old fisherman, soft window light", "a bowl of ramen on a wooden table, top view",
        "a snowy mountain village at night, warm lights in the windows"]), negative_prompt=NEGATIVE,
        resolutions="512,1024", seeds="0,1", sampler_name="euler", scheduler="sgm_uniform", sample_steps=20,
        cfg=4.5, train_steps=500, learning_rate=0.001, mode="layerwise+e2e", batch_size=2, seed=0)
    comparison(g, ["6", 0], "EDiT/sd35_distilled_original_vs_edit")
    g["8"]["inputs"].update(width=1024, height=1024)
    g["15"] = node("SaveEDiT", "Save EDiT", edit_bank=["6", 0], filename="sd35_medium_edit", overwrite=False)
    g["16"] = node("PreviewImage", "Loss curve", images=["6", 1])
    return g


# name -> (title, one-line description, what the thumbnail charts) for the template browser.
THUMBNAILS = {
    "sd35_medium_edit": ("SD3.5 Medium + EDiT at 2048 px",
                         "Text-to-image with your distilled EDiT bank: linear attention for image tokens.",
                         ("block", "sd35")),
    "pixart_sigma_edit": ("PixArt-Sigma + EDiT at 2048 px",
                          "Text-to-image with PixArt-Sigma 2K and an EDiT bank: linear compressed attention.",
                          ("block", "pixart")),
    "sd35_original_vs_edit": ("Original vs EDiT, same seed",
                              "Both images side by side, plus EDiT Speed Test's timing on your device.",
                              ("model", "sd35")),
    "sd35_distill_edit": ("Distill your own EDiT bank",
                          "Teacher samples, layer-wise + end-to-end training, Save EDiT, then compare.",
                          ("loss", "sd3")),
}

WORKFLOWS = {
    "sd35_medium_edit": (sd35_medium_edit, [
        "SD3.5 Medium text-to-image with EDiT at 2048x2048. Needs sd3.5_medium.safetensors (checkpoints/), "
        "clip_l, clip_g and t5xxl_fp16 (text_encoders/), and an EDiT bank in models/edit/ (make one with the "
        "sd35_distill_edit workflow or `python -m edit_core.distill`).",
        "Apply EDiT: 'enabled' off gives exactly the original model; start/end percent limit EDiT to part of "
        "sampling; min_tokens keeps small images on the original attention."]),
    "pixart_sigma_edit": (pixart_sigma_edit, [
        "PixArt-Sigma text-to-image with EDiT at 2048x2048. Needs PixArt-Sigma-XL-2-2K-MS (diffusion_models/), "
        "t5xxl_fp16 (text_encoders/), sdxl_vae (vae/) and an EDiT bank for PixArt-Sigma in models/edit/."]),
    "sd35_original_vs_edit": (sd35_original_vs_edit, [
        "Original (left) and EDiT (right) from the same seed, side by side, and EDiT Speed Test's timing report "
        "(original vs EDiT on this device at 2048x2048, batch 2 = one CFG step)."]),
    "sd35_distill_edit": (sd35_distill_edit, [
        "Distil your own EDiT bank from SD3.5 Medium: the teacher samples the prompts (one per line) at 512 and "
        "1024 px, then the bank trains layer-wise and end-to-end. Save EDiT writes it to models/edit/; the images "
        "compare original and EDiT from the same seed. Queue again after an interrupt to resume from the "
        "checkpoint. For long runs the CLI (python -m edit_core.distill, torchrun for several GPUs) is better."]),
}


# -- thumbnails ------------------------------------------------------------------------------
SIZE_PX = (800, 450)
JPEG_QUALITY = 88
INK, DIM, ACCENT, BASE, BG = "#f2f2f2", "#a8acb8", "#4fc3a1", "#6b7080", "#1d1f27"


def speedups(level: str, family: str):
    """(px, original ms / EDiT ms) at batch 1, 154 prompt tokens, from the measured benchmark."""
    rows = json.loads((REPO / "docs" / "bench" / "results.json").read_text())["rows"]
    out = {}
    for r in rows:
        if (r["level"], r["family"], r["batch"], r["prompt"]) == (level, family, 1, 154) and r["px"] >= 1024:
            out[r["px"]] = statistics.median(r["times"]["baseline"]) / statistics.median(r["times"]["edit"])
    return sorted(out.items())


def draw_speed_chart(draw, box, level: str, family: str, font, small):
    x0, y0, x1, y1 = box
    data = speedups(level, family)
    top = max(s for _, s in data)
    label = {"block": "one transformer block", "model": "whole model call"}[level]
    draw.text((x0, y0), f"EDiT speed-up over the original, {label}, measured on a 2-core CPU", font=small, fill=DIM)
    bar_w, gap = (x1 - x0 - 260) // len(data) - 40, 40  # the right 200 px hold the legend
    base_y, height = y1 - 30, y1 - y0 - 80
    for k, (px, speedup) in enumerate(data):
        bx = x0 + 60 + k * (bar_w + gap)
        h = max(4, int(height * speedup / top))
        draw.rectangle((bx, base_y - int(height / top), bx + bar_w // 3, base_y), fill=BASE)
        draw.rectangle((bx + bar_w // 3 + 6, base_y - h, bx + bar_w, base_y), fill=ACCENT)
        draw.text((bx + bar_w // 3 + 10, base_y - h - 30), f"{speedup:.1f}x", font=font, fill=INK)
        draw.text((bx, base_y + 6), f"{px} px", font=small, fill=DIM)
    draw.line((x0 + 40, base_y, x1 - 200, base_y), fill=DIM, width=1)
    draw.rectangle((x1 - 170, y0 + 60, x1 - 158, y0 + 72), fill=BASE)
    draw.text((x1 - 150, y0 + 57), "original = 1x", font=small, fill=DIM)
    draw.rectangle((x1 - 170, y0 + 84, x1 - 158, y0 + 96), fill=ACCENT)
    draw.text((x1 - 150, y0 + 81), "EDiT", font=small, fill=DIM)
    draw.text((x1 - 170, y0 + 108), "float32, batch 1", font=small, fill=DIM)


def draw_loss_panel(image, draw, box, family: str, small):
    x0, y0, x1, y1 = box
    draw.text((x0, y0), "distillation loss of a tiny teacher (docs/distillation.md)", font=small, fill=DIM)
    curve = Image.open(REPO / "docs" / "distill" / f"{family}_loss.png").convert("RGB")
    curve.thumbnail((x1 - x0, y1 - y0 - 28))
    image.paste(curve, (x0 + (x1 - x0 - curve.width) // 2, y0 + 26))


def render_thumbnail(name: str) -> Image.Image:
    title, line, (kind, family) = THUMBNAILS[name]
    image = Image.new("RGB", SIZE_PX, BG)
    draw = ImageDraw.Draw(image)
    big, mid, small = (ImageFont.load_default(size=s) for s in (34, 20, 15))
    draw.text((28, 18), "ComfyUI-EDiT", font=small, fill=ACCENT)
    draw.text((28, 40), title, font=big, fill=INK)
    for k, text in enumerate(textwrap.wrap(line, 70)[:2]):
        draw.text((28, 88 + 26 * k), text, font=mid, fill=DIM)
    panel = (28, 150, SIZE_PX[0] - 28, SIZE_PX[1] - 16)
    if kind == "loss":
        draw_loss_panel(image, draw, panel, family, small)
    else:
        draw_speed_chart(draw, panel, kind, family, mid, small)
    return image


def write_thumbnail(name: str) -> Path:
    path = REPO / "workflows" / f"{name}.jpg"
    render_thumbnail(name).save(path, "JPEG", quality=JPEG_QUALITY)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--thumbnails-only", action="store_true", help="rewrite only the .jpg thumbnails (no server)")
    args = p.parse_args(argv)
    for name in WORKFLOWS:
        print(f"wrote {write_thumbnail(name).relative_to(REPO)}")
    if args.thumbnails_only:
        return
    graphs = {name: build() for name, (build, _) in WORKFLOWS.items()}
    with tempfile.TemporaryDirectory() as base, ComfyServer(base) as server:
        object_info = server.get("/object_info", timeout=120)
    (REPO / "workflows" / "api").mkdir(parents=True, exist_ok=True)
    for name, g in graphs.items():
        (REPO / "workflows" / "api" / f"{name}.json").write_text(json.dumps(g, indent=2) + "\n")
        ui = api_to_ui(g, object_info, notes=WORKFLOWS[name][1])
        (REPO / "workflows" / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
