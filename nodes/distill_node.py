"""Distill EDiT weights from the connected model, inside a workflow."""
import math
import os

import comfy.samplers
import comfy.utils
import folder_paths

from ..edit_core.bank import EDiTError
from ..edit_core.distill.config import MODES, DistillConfig, parse_ints, parse_resolutions
from ..edit_core.distill.report import loss_curve, report_text
from ..edit_core.distill.train import distill
from ..edit_core.util.plots import to_comfy_image
from .bank_nodes import BANK


def _conditionings(clip, conditioning, prompts, what):
    """One CONDITIONING per prompt: each entry of a connected CONDITIONING, or each line
    encoded with the CLIP."""
    if conditioning is not None:
        return [[entry] for entry in conditioning]
    if clip is None:
        raise EDiTError(f"EDiT Distill needs a CLIP (to encode the {what}) or a connected {what} CONDITIONING")
    return [clip.encode_from_tokens_scheduled(clip.tokenize(p)) for p in prompts]


class EDiTDistill:
    DESCRIPTION = ("Distills EDiT weights from the model: the model samples one teacher image for every prompt "
                   "x seed x resolution (only its final latent is kept), then the EDiT bank learns to reproduce "
                   "the model's attention on re-noised images, the teacher running alongside (layer-wise, then "
                   "end-to-end). Interrupt any time: a checkpoint is kept and queueing the same workflow resumes.")
    CATEGORY = "EDiT/training"
    RETURN_TYPES = (BANK, "IMAGE", "STRING")
    RETURN_NAMES = ("edit_bank", "loss_curve", "report")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The teacher: your SD3/SD3.5 or PixArt-Sigma model (EDiT off)."}),
                "prompts": ("STRING", {"multiline": True, "default": "a photo of a cat\na city street at night",
                                       "tooltip": "One prompt per line (encoded with the CLIP input)."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": ""}),
                "resolutions": ("STRING", {"default": "512", "tooltip":
                                           "Comma-separated, trained in ascending order: '512,1024' or '768x512'."}),
                "seeds": ("STRING", {"default": "0,1", "tooltip": "Noise seeds per prompt for the teacher data."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler"}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "simple"}),
                "sample_steps": ("INT", {"default": 20, "min": 1, "max": 200}),
                "cfg": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 30.0, "step": 0.1}),
                "train_steps": ("INT", {"default": 500, "min": 1, "max": 1000000}),
                "learning_rate": ("FLOAT", {"default": 0.001, "min": 1e-6, "max": 1.0, "step": 0.0001}),
                "mode": (list(MODES), {"tooltip": "layer-wise (fast, low memory) then end-to-end, or either alone."}),
                "batch_size": ("INT", {"default": 2, "min": 1, "max": 256}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Encodes prompts and negative prompt."}),
                "positive": ("CONDITIONING", {"tooltip": "Instead of CLIP + prompts: each entry is one prompt."}),
                "negative": ("CONDITIONING", {"tooltip": "Instead of CLIP + negative prompt."}),
                "edit_bank": (BANK, {"tooltip": "Continue from this bank (default: a new untrained bank, all layers)."}),
                "latent": ("LATENT", {"tooltip": "Your own latents: adds a task loss in the end-to-end phase."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def run(self, model, prompts, negative_prompt, resolutions, seeds, sampler_name, scheduler, sample_steps, cfg,
            train_steps, learning_rate, mode, batch_size, seed, clip=None, positive=None, negative=None,
            edit_bank=None, latent=None, unique_id=None):
        for name, value in (("cfg", cfg), ("learning_rate", learning_rate)):
            if not math.isfinite(value):
                raise EDiTError(f"EDiT Distill: {name} must be a finite number, got {value}")
        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        pos = _conditionings(clip, positive, lines, "prompts")
        neg = _conditionings(clip, negative, [negative_prompt], "negative prompt")[0]
        if not pos:
            raise EDiTError("EDiT Distill: no prompts")
        config = DistillConfig(resolutions=parse_resolutions(resolutions), seeds=parse_ints(seeds),
                               sampler=sampler_name, scheduler=scheduler, sample_steps=sample_steps, cfg=cfg,
                               train_steps=train_steps, batch_size=batch_size, lr=learning_rate, mode=mode, seed=seed,
                               task_weight=1.0 if latent is not None else 0.0)
        bars = {}

        def progress(event):
            bar = bars.setdefault(event["stage"], comfy.utils.ProgressBar(event["total"], node_id=unique_id))
            bar.update_absolute(event["step"], event["total"])  # raises on /interrupt: distill checkpoints
            if "loss" in event and unique_id is not None:
                from server import PromptServer  # ComfyUI's, already loaded when a node runs
                PromptServer.instance.send_progress_text(
                    f"step {event['step']}/{event['total']} ({event['mode']}) loss {event['loss']:.4f}", unique_id)

        work_dir = os.path.join(folder_paths.get_output_directory(), "edit_distill")
        result = distill(model, pos, neg, config, work_dir, bank=edit_bank,
                         latents=latent["samples"] if latent is not None else None, on_progress=progress)
        report = report_text(result)
        # The report also goes to the UI and the prompt's /history entry.
        return {"ui": {"text": [report]}, "result": (result.bank, to_comfy_image(loss_curve(result)), report)}
