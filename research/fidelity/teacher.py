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
position embedding in ComfyUI divides by zero below 34 px), then 64 px. The teacher is the
exponential moving average of the weights. The result is cached as one safetensors file
named by the fingerprint of its settings and data.
"""
import json
import math
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
    ema: float = 0.995
    caption_dropout: float = 0.1
    seed: int = 0

    @property
    def heads(self) -> int:
        return self.width // 64


QUICK = {"sd3": TeacherConfig("sd3", width=64, depth=2, mmditx_layers=(0,), schedule=((40, 4), (64, 2)), batch_size=4),
         "pixart": TeacherConfig("pixart", width=64, depth=2, schedule=((40, 4), (64, 2)), batch_size=4)}
# About 22 minutes each on one thread of the 2-core development VM, run side by side (SD3's
# joint blocks, text stream and attn2 layers make its step about 1.4 times PixArt's).
FULL = {"sd3": TeacherConfig("sd3", schedule=((40, 1200), (64, 180))), "pixart": TeacherConfig("pixart")}


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


def build_base_model(config: TeacherConfig):
    mc = model_config(config)
    mc.set_inference_dtype(torch.float32, None)
    return mc, mc.get_model({}, "")


@dataclass
class Teacher:
    config: TeacherConfig
    patcher: object                      # ComfyUI ModelPatcher
    encoder: CaptionEncoder
    vocabulary: Vocabulary
    history: List[Dict]                  # {"step", "px", "loss"}
    seconds: float
    source: str

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


def _batch(data: EmojiSet, x: torch.Tensor, vocabulary: Vocabulary, config: TeacherConfig, g: torch.Generator):
    idx = torch.randint(len(data), (config.batch_size,), generator=g)
    drop = torch.rand(config.batch_size, generator=g) < config.caption_dropout
    captions = ["" if d else data.captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
    return x[idx], vocabulary.encode(captions, config.caption_tokens)


def train_teacher(config: TeacherConfig, data: EmojiSet, work_dir: Path,
                  on_step: Optional[Callable[[int, int, float], None]] = None) -> Teacher:
    """Train (or load from ``work_dir``) the teacher for ``config`` on ``data``'s training split."""
    path = Path(work_dir) / f"teacher-{config.family}-{teacher_fingerprint(config, data.source)}.safetensors"
    if path.is_file():
        return load_teacher(path)
    train = data.split(held_out=False)
    vocabulary = Vocabulary.build(train.captions)
    torch.manual_seed(config.seed)
    mc, base = build_base_model(config)
    init_weights_(base.diffusion_model, config.seed)
    encoder = CaptionEncoder(len(vocabulary), config.caption_tokens, config.context_dim)
    params = list(base.diffusion_model.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    ms = base.model_sampling
    g = torch.Generator().manual_seed(config.seed)
    history, step, t0 = [], 0, time.perf_counter()
    total = sum(n for _, n in config.schedule)
    with torch.inference_mode(False), torch.enable_grad():
        for px, steps in config.schedule:
            x_all = image_to_latent(config.family, to_unit(train.images, px))
            for _ in range(steps):
                x0, ids = _batch(train, x_all, vocabulary, config, g)
                for group in opt.param_groups:
                    group["lr"] = config.lr * min(1.0, (step + 1) / config.warmup_steps)
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
                if on_step:
                    on_step(step, total, history[-1]["loss"])
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    tensors = {f"model.{k}": v for k, v in base.diffusion_model.state_dict().items()}
    tensors |= {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(asdict(config)), "vocabulary": json.dumps(vocabulary.words),
            "history": json.dumps(history), "seconds": f"{seconds:.1f}", "source": data.source}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, meta)
    return load_teacher(path)


def _config_from(meta: Dict) -> TeacherConfig:
    raw = json.loads(meta["config"])
    raw["mmditx_layers"] = tuple(raw["mmditx_layers"])
    raw["schedule"] = tuple(tuple(s) for s in raw["schedule"])
    return TeacherConfig(**raw)


def load_teacher(path: Path) -> Teacher:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an emoji teacher (format {meta.get('format')!r}, expected {FORMAT!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = _config_from(meta)
    vocabulary = Vocabulary(json.loads(meta["vocabulary"]))
    mc, base = build_base_model(config)
    base.diffusion_model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    encoder = CaptionEncoder(len(vocabulary), config.caption_tokens, config.context_dim)
    encoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")})
    encoder.requires_grad_(False)
    base.diffusion_model.requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return Teacher(config, patcher, encoder, vocabulary, json.loads(meta["history"]), float(meta["seconds"]),
                   meta["source"])
