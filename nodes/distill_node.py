"""Distill EDiT weights from the connected model, inside a workflow."""
import math
import os

import comfy.samplers
import comfy.utils
import folder_paths

from ..edit_core.errors import EDiTError
from ..edit_core.distill.config import SETTINGS, DistillConfig
from ..edit_core.distill.report import loss_curve, report_text
from ..edit_core.distill.train import distill
from ..edit_core.util.cli import prompt_lines
from ..edit_core.util.plots import to_comfy_image
from ..edit_core.util.settings import values_from, widgets
from .bank_nodes import BANK


def _conditionings(clip, conditioning, prompts, what):
    """One CONDITIONING per prompt: each entry of a connected CONDITIONING, or each line
    encoded with the CLIP."""
    if conditioning is not None:
        return [[entry] for entry in conditioning]
    if clip is None:
        raise EDiTError(f"EDiT Distill needs a CLIP (to encode the {what}) or a connected {what} CONDITIONING")
    return [clip.encode_from_tokens_scheduled(clip.tokenize(p)) for p in prompts]


# The DistillConfig settings the node shows, in widget order (saved workflows depend on it);
# the others keep their defaults here and are flags of python -m edit_core.distill.
SHOWN = ("resolutions", "seeds", "sampler", "scheduler", "sample_steps", "cfg", "train_steps", "lr", "mode",
         "batch_size", "seed")


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
                **widgets(SETTINGS, SHOWN, choices={"sampler": comfy.samplers.KSampler.SAMPLERS,
                                                    "scheduler": comfy.samplers.KSampler.SCHEDULERS}),
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

    def run(self, model, prompts, negative_prompt, clip=None, positive=None, negative=None, edit_bank=None,
            latent=None, unique_id=None, **settings):
        for name in ("cfg", "learning_rate"):
            if not math.isfinite(settings[name]):
                raise EDiTError(f"EDiT Distill: {name} must be a finite number, got {settings[name]}")
        lines = prompt_lines(prompts)
        pos = _conditionings(clip, positive, lines, "prompts")
        neg = _conditionings(clip, negative, [negative_prompt], "negative prompt")[0]
        if not pos:
            raise EDiTError("EDiT Distill: no prompts")
        config = DistillConfig(**values_from(SETTINGS, settings, by="widget"),
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
