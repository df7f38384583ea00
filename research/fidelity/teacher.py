"""Small text-to-image teachers trained here on the emoji set, built from ComfyUI's own
classes, so that EDiT students are judged against attention that was learned.

- SD3 family: ComfyUI's MMDiT (``comfy.supported_models.SD3``, model_base.SD3: rectified flow)
  with RMS q/k-norm and MMDiT-X ``attn2`` layers, as in SD3.5. Its latent is the image's RGBA
  channels repeated four times (16 channels, the family's width; the inverse is the mean of
  the four copies). ComfyUI's MMDiT mis-sizes its position embedding at patch size 1, so the
  patch stays 2 and pixel-unshuffling to 16 channels would halve the token grid.
- PixArt family: ComfyUI's PixArt-Sigma (``PixArtMS``) on PixArt's discrete noise schedule,
  trained for v-prediction (ComfyUI's ``ModelType.V_PREDICTION``) rather than PixArt's eps:
  with a few thousand steps an eps model's error, multiplied by sigma up to 157, swamps its
  samples. Its latent is the RGBA image itself (4 channels).

Both maps are fixed and exactly invertible, and with patch size 2 both give one token per
2 x 2 pixels: 32 x 32 tokens for a 64 px image. ComfyUI counts latents in units of 8 px, so a
64 px emoji is a "512 px" latent for ComfyUI (``comfy_resolution``).

Training: the model's own ``apply_model`` (ComfyUI's noise scaling, input scaling and
denoising for its family); the loss is the error of the model's own target, written through
the denoised image: velocity for SD3 (||denoised - x0||^2 / sigma^2, timesteps logit-normal
as in SD3), v for PixArt (x (1 + sigma^2) / sigma^2, timesteps uniform). Captions are dropped
one time in ten for classifier-free guidance. Progressive resolution: 40 px first (PixArt's
position embedding in ComfyUI divides by zero below 34 px), then 64 px; learning rate warmed
up, then cosine-decayed. The teacher is the exponential moving average of the weights. The
result is one safetensors file named by the fingerprint of its settings and data; the run
keeps a resumable checkpoint beside it. The FULL teachers ship with the pack (``shipped``),
so studies and tests load them instead of training.
"""
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from safetensors import safe_open

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

from edit_core.distill.config import fingerprint
from edit_core.util.safetensors_io import save_safetensors
from . import shipped
from .captions import CaptionEncoder, Vocabulary
from .emoji import EmojiSet, to_unit

FORMAT = "comfyui-edit/emoji-teacher/2"
POS_EMBED_MAX = 64  # SD3 token grids up to 64 x 64 (128 px)


class EmojiLatent16(comfy.latent_formats.LatentFormat):
    latent_channels = 16


class EmojiLatent4(comfy.latent_formats.LatentFormat):
    latent_channels = 4


class EmojiSD3(comfy.supported_models.SD3):
    latent_format = EmojiLatent16
    sampling_settings = {"shift": 1.0}  # 1024 tokens, not SD3's 4096 at 1024 px


class EmojiPixArt(comfy.supported_models.PixArtSigma):
    latent_format = EmojiLatent4

    def get_model(self, state_dict, prefix="", device=None):
        return comfy.model_base.PixArt(self, model_type=comfy.model_base.ModelType.V_PREDICTION, device=device).eval()


@dataclass(frozen=True)
class TeacherConfig:
    family: str                                   # "sd3" or "pixart"
    width: int = 128                              # hidden size; heads of 64
    depth: int = 3
    mmditx_layers: Tuple[int, ...] = (0, 1)       # SD3 blocks with an attn2
    context_dim: int = 64
    caption_tokens: int = 16
    schedule: Tuple[Tuple[int, int], ...] = ((40, 1600), (64, 180))  # (image px, steps)
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 100
    lr_final: float = 1.0                         # share of lr at the last step (cosine decay); 1 = constant
    ema: float = 0.995
    caption_dropout: float = 0.1
    seed: int = 0

    @property
    def heads(self) -> int:
        return self.width // 64


QUICK = {"sd3": TeacherConfig("sd3", width=64, depth=2, mmditx_layers=(0,), schedule=((40, 4), (64, 2)), batch_size=4),
         "pixart": TeacherConfig("pixart", width=64, depth=2, schedule=((40, 4), (64, 2)), batch_size=4)}
# Four blocks (SD3: attn2 in the first two, six convertible layers; PixArt: four); 101 and 93
# minutes on one thread of the 2-core development VM, side by side. They ship (shipped.py);
# how well they draw is in docs/fidelity.md.
FULL = {"sd3": TeacherConfig("sd3", depth=4, schedule=((40, 5400), (64, 700)), lr=1.5e-3, warmup_steps=200,
                             lr_final=0.05, ema=0.998),
        "pixart": TeacherConfig("pixart", depth=4, schedule=((40, 6400), (64, 800)), lr=1.5e-3, warmup_steps=200,
                                lr_final=0.05, ema=0.998)}
RESUME_EVERY = 200  # steps between resumable training checkpoints
REPRODUCE = "bash scripts/edit.sh fidelity teachers --threads 1 --retrain --families {family}"


def image_to_latent(family: str, x: torch.Tensor) -> torch.Tensor:
    return x.repeat(1, 4, 1, 1) if family == "sd3" else x


def latent_to_image(family: str, z: torch.Tensor) -> torch.Tensor:
    return z.unflatten(1, (4, 4)).mean(1) if family == "sd3" else z


def comfy_resolution(family: str, image_px: int) -> Tuple[int, int]:
    """ComfyUI's (width, height), in its units of 8 px per latent pixel, for an ``image_px`` emoji."""
    return image_px * 8, image_px * 8


def model_config(config: TeacherConfig):
    c, ctx = config.width, config.context_dim
    if config.family == "sd3":
        p = POS_EMBED_MAX
        unet = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": config.heads,
                "num_blocks": config.depth, "adm_in_channels": ctx, "pos_embed_max_size": p, "num_patches": p * p,
                "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": ctx, "out_features": c}},
                "qk_norm": "rms", "x_block_self_attn_layers": list(config.mmditx_layers),
                "pos_embed_scaling_factor": None}
        return EmojiSD3(unet)
    unet = {"image_model": "pixart_sigma", "hidden_size": c, "num_heads": config.heads, "depth": config.depth,
            "patch_size": 2, "in_channels": 4, "micro_condition": False, "model_max_length": config.caption_tokens,
            "caption_channels": ctx, "input_size": 64, "pe_interpolation": 1}
    return EmojiPixArt(unet)


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int):
    """DiT-style start: matrices ~ N(0, 1/fan_in), biases 0, norm scales 1, and the adaLN
    modulations and the output layer zero (every block starts as the identity)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        parts = name.split(".")
        if "adaLN_modulation" in parts or name.startswith(("final_layer.linear.", "t_block.")):
            p.zero_()
        elif p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        elif any(s in name for s in ("ln_q", "ln_k", "norm")) and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    if hasattr(model, "pos_embed") and model.pos_embed is not None:
        model.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(model.pos_embed.shape[-1], POS_EMBED_MAX)).float()
                              .unsqueeze(0))


def build_base_model(config: TeacherConfig, dtype=torch.float32):
    mc = model_config(config)
    mc.set_inference_dtype(dtype, None)
    return mc, mc.get_model({}, "")


def patcher_of(base) -> "comfy.model_patcher.ModelPatcher":
    return comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


@dataclass
class Teacher:
    config: TeacherConfig
    patcher: object                      # ComfyUI ModelPatcher
    encoder: CaptionEncoder
    vocabulary: Vocabulary
    history: List[Dict]                  # {"step", "px", "loss"}
    seconds: float
    source: str
    file: Path                           # where it was loaded from
    digest: str                          # weights_digest of its tensors

    @property
    def family(self) -> str:
        return self.config.family

    @torch.no_grad()
    def conditioning(self, caption: str):
        """ComfyUI CONDITIONING for ``caption`` ("" = the unconditional input)."""
        context, pooled = self.encoder(self.vocabulary.encode([caption], self.config.caption_tokens))
        return [[context.clone(), {"pooled_output": pooled.clone()} if self.family == "sd3" else {}]]

    def resolution(self, image_px: int) -> Tuple[int, int]:
        return comfy_resolution(self.family, image_px)

    def images(self, latent: torch.Tensor) -> torch.Tensor:
        """Sampled latents -> [-1, 1] RGBA images."""
        return latent_to_image(self.family, latent.float())

    def patcher_in(self, dtype) -> "comfy.model_patcher.ModelPatcher":
        """The same teacher with its weights and compute in ``dtype`` (a separate copy), as
        ComfyUI runs a model loaded in that dtype."""
        _, base = build_base_model(self.config, dtype)
        base.diffusion_model.load_state_dict(self.patcher.model.diffusion_model.state_dict())
        base.diffusion_model.requires_grad_(False)
        return patcher_of(base)


def training_sigmas(family: str, ms, n: int, g: torch.Generator) -> torch.Tensor:
    """SD3: logit-normal t (SD3's own choice); PixArt: uniform over its discrete timesteps."""
    if family == "sd3":
        return ms.sigma(torch.sigmoid(torch.randn(n, generator=g)) * 1000)
    return ms.sigma(torch.rand(n, generator=g) * (len(ms.sigmas) - 1))


def target_weight(family: str, sigma: torch.Tensor) -> torch.Tensor:
    """||target error||^2 / ||x0 error||^2: velocity (SD3), v with sigma_data 1 (PixArt)."""
    return (1 + sigma ** 2) / sigma ** 2 if family == "pixart" else 1 / sigma ** 2


def teacher_fingerprint(config: TeacherConfig, source: str) -> str:
    return fingerprint([FORMAT, asdict(config), source])


def teacher_file_name(config: TeacherConfig, source: str) -> str:
    return f"teacher-{config.family}-{teacher_fingerprint(config, source)}.safetensors"


def ship(teacher: "Teacher") -> Path:
    """Copy ``teacher``'s file into the shipped folder and record it in the manifest under
    ``teacher-<family>`` (replacing the family's previous teacher)."""
    key = f"teacher-{teacher.family}"
    old = shipped.entries().get(key, {}).get("file")
    target = shipped.FOLDER / teacher.file.name
    if teacher.file.resolve() != target.resolve():
        shipped.FOLDER.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(teacher.file, target)
    if old and old != target.name:
        (shipped.FOLDER / old).unlink(missing_ok=True)
    params = sum(v.numel() for v in teacher.patcher.model.diffusion_model.state_dict().values())
    shipped.record(key, {"file": target.name, "weights_sha256": teacher.digest,
                         "config_fingerprint": teacher_fingerprint(teacher.config, teacher.source),
                         "command": REPRODUCE.format(family=teacher.family), "train_seconds": round(teacher.seconds),
                         "steps": len(teacher.history), "model_parameters": params, "bytes": target.stat().st_size})
    return target


def _batch(data: EmojiSet, x: torch.Tensor, vocabulary: Vocabulary, config: TeacherConfig, g: torch.Generator):
    idx = torch.randint(len(data), (config.batch_size,), generator=g)
    drop = torch.rand(config.batch_size, generator=g) < config.caption_dropout
    captions = ["" if d else data.captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
    return x[idx], vocabulary.encode(captions, config.caption_tokens)


def learning_rate(config: TeacherConfig, step: int, total: int) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``lr * lr_final`` at the last step."""
    warm = min(1.0, (step + 1) / config.warmup_steps)
    decay = config.lr_final + (1 - config.lr_final) * 0.5 * (1 + math.cos(math.pi * step / max(total - 1, 1)))
    return config.lr * warm * decay


def _resume_tensors(params, opt, g: torch.Generator) -> Dict[str, torch.Tensor]:
    """The training state beside the averaged weights (which the checkpoint holds by name)."""
    state = opt.state_dict()["state"]
    tensors = {"rng": g.get_state()}
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = p.detach()
        if i in state:
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"{key}.{i}"] = state[i][key]
            tensors[f"adam_step.{i}"] = state[i]["step"].reshape(1)
    return tensors


def _resume_from(path: Path, names: List[str], params, ema, opt, g: torch.Generator) -> Tuple[int, List[Dict], float]:
    """Load a training checkpoint written by ``train_teacher``: (next step, history, seconds so far)."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT + "/resume" or f"param.{len(params) - 1}" not in tensors:
        raise ValueError(f"{path}: not a training checkpoint of this teacher (format {meta.get('format')!r})")
    with torch.no_grad():
        for i, (p, e) in enumerate(zip(params, ema)):
            p.copy_(tensors[f"param.{i}"])
            e.copy_(tensors[names[i]])
    state = {i: {"step": tensors[f"adam_step.{i}"].reshape(()), "exp_avg": tensors[f"exp_avg.{i}"],
                 "exp_avg_sq": tensors[f"exp_avg_sq.{i}"]} for i in range(len(params)) if f"exp_avg.{i}" in tensors}
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    g.set_state(tensors["rng"])
    history = json.loads(meta["history"])
    return len(history), history, float(meta["seconds"])


def train_teacher(config: TeacherConfig, data: EmojiSet, work_dir: Path,
                  on_step: Optional[Callable[[int, int, float], None]] = None, retrain: bool = False) -> Teacher:
    """The teacher for ``config`` on ``data``'s training split: from ``work_dir`` if trained
    there, else the shipped one (checked against its recorded digest) unless ``retrain``, else
    trained in ``work_dir``. Every ``RESUME_EVERY`` steps the whole training state goes to
    ``<name>.resume.safetensors`` beside it, and an interrupted run continues from there."""
    path = Path(work_dir) / teacher_file_name(config, data.source)
    if path.is_file():
        return load_teacher(path)
    shipped_path = None if retrain else shipped.shipped_file(f"teacher-{config.family}", path.name)
    if shipped_path:
        return load_teacher(shipped_path, shipped_key=f"teacher-{config.family}")
    resume = path.with_suffix(".resume.safetensors")
    train = data.split(held_out=False)
    vocabulary = Vocabulary.build(train.captions)
    torch.manual_seed(config.seed)
    mc, base = build_base_model(config)
    init_weights_(base.diffusion_model, config.seed)
    encoder = CaptionEncoder(len(vocabulary), config.caption_tokens, config.context_dim)
    named = [(f"model.{k}", v) for k, v in base.diffusion_model.named_parameters()]
    named += [(f"encoder.{k}", v) for k, v in encoder.named_parameters()]
    names, params = [k for k, _ in named], [v for _, v in named]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    ms = base.model_sampling
    g = torch.Generator().manual_seed(config.seed)
    history, step, seconds = [], 0, 0.0
    if resume.is_file():
        step, history, seconds = _resume_from(resume, names, params, ema, opt, g)
    meta = {"config": json.dumps(asdict(config)), "vocabulary": json.dumps(vocabulary.words), "source": data.source}

    def save(target: Path, tensors, fmt: str, seconds: float):
        save_safetensors(tensors, target, dict(meta, format=fmt, history=json.dumps(history), seconds=f"{seconds:.1f}"))

    def averaged() -> Dict[str, torch.Tensor]:
        """The saved weights: the averages in place of the parameters (buffers as they are)."""
        by_param = {id(p): e for p, e in zip(params, ema)}
        tensors = {f"model.{k}": by_param.get(id(v), v).detach()
                   for k, v in base.diffusion_model.state_dict(keep_vars=True).items()}
        return tensors | {f"encoder.{k}": by_param[id(v)] for k, v in encoder.state_dict(keep_vars=True).items()}

    total = sum(n for _, n in config.schedule)
    t0 = time.perf_counter() - seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.enable_grad():
        done = 0
        for px, steps in config.schedule:
            done += steps
            if step >= done:
                continue
            x_all = image_to_latent(config.family, to_unit(train.images, px))
            while step < done:
                x0, ids = _batch(train, x_all, vocabulary, config, g)
                for group in opt.param_groups:
                    group["lr"] = learning_rate(config, step, total)
                sigma = training_sigmas(config.family, ms, len(x0), g)
                noise = torch.randn(x0.shape, generator=g)
                noisy = ms.noise_scaling(sigma, noise, x0)
                context, pooled = encoder(ids)
                extra = {"y": pooled} if config.family == "sd3" else {}
                denoised = base.apply_model(noisy, sigma, c_crossattn=context, **extra)
                loss = ((denoised - x0).square().mean((1, 2, 3)) * target_weight(config.family, sigma)).mean()
                if not torch.isfinite(loss):
                    raise RuntimeError(f"teacher training diverged at step {step} (loss {loss.item()})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                with torch.no_grad():
                    decay = min(config.ema, (1 + step) / (10 + step))
                    for e, p in zip(ema, params):
                        e.lerp_(p, 1 - decay)
                history.append({"step": step, "px": px, "loss": loss.item()})
                step += 1
                if step % RESUME_EVERY == 0 and step < total:
                    save(resume, averaged() | _resume_tensors(params, opt, g), FORMAT + "/resume",
                         time.perf_counter() - t0)
                if on_step:
                    on_step(step, total, history[-1]["loss"])
    save(path, averaged(), FORMAT, time.perf_counter() - t0)
    resume.unlink(missing_ok=True)
    return load_teacher(path)


def _config_from(meta: Dict) -> TeacherConfig:
    raw = json.loads(meta["config"])
    raw["mmditx_layers"] = tuple(raw["mmditx_layers"])
    raw["schedule"] = tuple(tuple(s) for s in raw["schedule"])
    return TeacherConfig(**raw)


def load_teacher(path: Path, partial: bool = False, shipped_key: str = "") -> Teacher:
    """The teacher in ``path``; ``partial`` also reads the averaged weights of a training
    checkpoint (``.resume.safetensors``), to look at a run that is still going;
    ``shipped_key``: a shipped file, refused unless its weights are the ones recorded."""
    formats = (FORMAT, FORMAT + "/resume") if partial else (FORMAT,)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") not in formats:
            raise ValueError(f"{path}: not an emoji teacher (format {meta.get('format')!r}, expected {FORMAT!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("model.", "encoder."))}
    digest = shipped.check_digest(path, tensors, shipped_key) if shipped_key else shipped.weights_digest(tensors)
    config = _config_from(meta)
    vocabulary = Vocabulary(json.loads(meta["vocabulary"]))
    mc, base = build_base_model(config)
    base.diffusion_model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    encoder = CaptionEncoder(len(vocabulary), config.caption_tokens, config.context_dim)
    encoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")})
    encoder.requires_grad_(False)
    base.diffusion_model.requires_grad_(False)
    patcher = patcher_of(base)
    return Teacher(config, patcher, encoder, vocabulary, json.loads(meta["history"]), float(meta["seconds"]),
                   meta["source"], Path(path), digest)
