"""Tiny random models built from ComfyUI's own classes: for tests, the example run with no
real checkpoint, and benchmarks at real widths.

- SD3/SD3.5: an MMDiT state dict that ComfyUI's model detection recognises (hidden size is
  64 * depth there, so depth 2 gives hidden 128 with 2 heads of 64). SD3.5 marks: RMS qk-norm,
  MMDiT-X ``attn2`` layers.
- PixArt-Sigma: detection fixes hidden 1152 / 16 heads, so a detectable file is ~40M
  parameters even at depth 1; ``pixart_patcher`` builds ComfyUI's PixArt class at any width
  for in-process use.
- A 16- or 4-channel TAESD-layout VAE that VAELoader detects.

Weights are seeded random with 1/sqrt(fan_in) scale. Random-init attention is close to
uniform and random, unlike a trained DiT's, which would make distillation tests meaningless.
Two knobs make it trained-like: ``local_attention`` ties each k projection to its q
projection (tokens attend to similar tokens) and lets the sin-cos position embedding dominate
the patch content (similar tokens are nearby ones); ``attention_gain`` multiplies the logits
(through the q/k-norm weights, or the q/k projection rows where a model has no q/k norm)
to make attention peaked.
"""
import json
import math
import zlib
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.supported_models
import comfy.taesd.taesd
from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper, get_2d_sincos_pos_embed
from comfy.ldm.pixart.pixartms import PixArtMS

from .bank import init_bank, save_bank
from .comfy_model import model_spec
from .tiny_names import TINY_BANKS, TINY_PIXART, TINY_SD35, TINY_VAE4, TINY_VAE16

SD3_CONTEXT_DIM = 4096   # T5-XXL width (CLIP-L/G features are zero-padded to it by ComfyUI)
SD3_POOLED_DIM = 2048    # CLIP-L + CLIP-G pooled
PIXART_CONTEXT_DIM = 4096



@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, skip: Iterable[str] = ()):
    """Seeded random weights: matrices ~ N(0, 1/fan_in), norm scales ~ 1, other vectors ~ N(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if any(s in name for s in skip):
            continue
        if p.ndim >= 2:
            v = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
        elif any(s in name for s in ("ln_q", "ln_k", "norm")):
            v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            v = 0.02 * torch.randn(p.shape, generator=g)
        p.copy_(v.to(p.dtype))
    return module


def _self_attentions(model):
    return [m for m in model.modules() if isinstance(getattr(m, "qkv", None), torch.nn.Linear)]


@torch.no_grad()
def make_attention_local_(model: torch.nn.Module, tie: float = 0.3, content_scale: float = 0.25):
    """k's projection becomes q's plus ``tie`` times its own random one (q/k biases dropped,
    k-norm = q-norm), so logits follow token similarity; the patch embedding is scaled by
    ``content_scale`` against the position embedding, so similar tokens are nearby ones."""
    for m in _self_attentions(model):
        c = m.qkv.out_features // 3
        m.qkv.weight[c:2 * c] = m.qkv.weight[:c] + tie * m.qkv.weight[c:2 * c]
        if m.qkv.bias is not None:
            m.qkv.bias[:2 * c] = 0
        for q_norm, k_norm in (("ln_q", "ln_k"), ("q_norm", "k_norm")):
            if getattr(getattr(m, q_norm, None), "weight", None) is not None:
                getattr(m, k_norm).weight.copy_(getattr(m, q_norm).weight)
    model.x_embedder.proj.weight.mul_(content_scale)
    model.x_embedder.proj.bias.mul_(content_scale)


@torch.no_grad()
def sharpen_attention_(model: torch.nn.Module, gain: float):
    """Multiply every self-attention's logits by ``gain`` (sqrt(gain) on q and on k)."""
    s = math.sqrt(gain)
    for m in _self_attentions(model):
        c = m.qkv.out_features // 3
        norms = [getattr(m, n, None) for n in ("ln_q", "ln_k", "q_norm", "k_norm")]
        scaled = [n for n in norms if getattr(n, "weight", None) is not None]
        if scaled:
            for n in scaled:
                n.weight.mul_(s)
        else:
            m.qkv.weight[:2 * c].mul_(s)
            if m.qkv.bias is not None:
                m.qkv.bias[:2 * c].mul_(s)


def sd3_state_dict(depth: int = 2, mmditx_layers: Iterable[int] = (0,), qk_norm: bool = True,
                   pos_embed_max_size: int = 64, seed: int = 0, attention_gain: float = 1.0,
                   local_attention: bool = False, dtype=torch.float32):
    """An SD3 (qk_norm=False, no MMDiT-X) or SD3.5-style MMDiT state dict ComfyUI detects."""
    hidden = 64 * depth
    p = pos_embed_max_size
    model = OpenAISignatureMMDITWrapper(
        patch_size=2, in_channels=16, out_channels=16, depth=depth, adm_in_channels=SD3_POOLED_DIM,
        context_embedder_config={"target": "torch.nn.Linear",
                                 "params": {"in_features": SD3_CONTEXT_DIM, "out_features": hidden}},
        num_patches=p * p, pos_embed_max_size=p, qk_norm="rms" if qk_norm else None,
        x_block_self_attn_layers=list(mmditx_layers), operations=comfy.ops.disable_weight_init,
        dtype=torch.float32, device="cpu")
    randomize_(model, seed, skip=("pos_embed",))
    model.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(hidden, p)).float().unsqueeze(0))
    if local_attention:
        make_attention_local_(model)
    sharpen_attention_(model, attention_gain)
    return {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}


def sd3_patcher(dtype=None, **kwargs):
    """A ComfyUI ModelPatcher for a tiny SD3/SD3.5 model, through ComfyUI's own detection."""
    patcher = comfy.sd.load_diffusion_model_state_dict(sd3_state_dict(**kwargs), {"dtype": dtype} if dtype else {})
    if patcher is None:
        raise RuntimeError("ComfyUI did not detect the tiny SD3 state dict")
    return patcher


def pixart_unet_config(hidden: int, heads: int, depth: int):
    return {"image_model": "pixart_sigma", "hidden_size": hidden, "num_heads": heads, "depth": depth,
            "patch_size": 2, "in_channels": 4, "micro_condition": False, "model_max_length": 300,
            "caption_channels": PIXART_CONTEXT_DIM, "input_size": 128, "pe_interpolation": 2}


def pixart_state_dict(hidden: int = 1152, heads: int = 16, depth: int = 1, seed: int = 0,
                      attention_gain: float = 1.0, local_attention: bool = False, dtype=torch.float32):
    """A PixArt-Sigma state dict; at hidden 1152 / 16 heads ComfyUI detects it from a file."""
    cfg = pixart_unet_config(hidden, heads, depth)
    cfg.pop("image_model")
    model = PixArtMS(**cfg, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    randomize_(model, seed)
    if local_attention:
        make_attention_local_(model)
    sharpen_attention_(model, attention_gain)
    return {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}


def pixart_patcher(hidden: int = 96, heads: int = 4, depth: int = 2, seed: int = 0, attention_gain: float = 1.0,
                   local_attention: bool = False, dtype=torch.float32):
    """A ComfyUI ModelPatcher for PixArt-Sigma at any width (ComfyUI's classes, built directly)."""
    sd = pixart_state_dict(hidden, heads, depth, seed, attention_gain, local_attention)
    model_config = comfy.supported_models.PixArtSigma(pixart_unet_config(hidden, heads, depth))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


@torch.no_grad()
def taesd_state_dict(latent_channels: int, seed: int = 0):
    """A TAESD-layout VAE that VAELoader detects, every tensor seeded (ComfyUI builds TAESD
    from ``disable_weight_init`` layers, which leave memory uninitialised). The decoder is a
    fixed random network whose last conv is scaled so that latents of unit size decode to
    values around 0.5 +- 0.2 in each colour: finite, non-constant images that follow the latent."""
    vae = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    randomize_(vae, seed, skip=("vae_scale", "vae_shift"))  # those two are set by the constructor
    for block in vae.taesd_decoder:
        if isinstance(block, comfy.taesd.taesd.Block):  # near-identity residual blocks: a smooth decoder
            block.conv[-1].weight.mul_(0.1)
    last = vae.taesd_decoder[-1]
    # Probes of several sizes, as sampled latents vary widely; each colour channel is centred.
    g = torch.Generator().manual_seed(seed)
    probe = torch.cat([s * torch.randn(1, latent_channels, 8, 8, generator=g) for s in (0.5, 1.0, 2.0, 4.0)])
    raw = vae.taesd_decoder(probe)
    # Rounded to 2 significant digits so the file does not depend on float summation order.
    gain = float(f"{0.2 / max(raw.std().item(), 1e-12):.1e}")
    mean = torch.tensor([float(f"{m:.1e}") for m in raw.mean(dim=(0, 2, 3)).tolist()])
    last.weight.mul_(gain)
    last.bias.copy_(0.5 + gain * (last.bias - mean))
    return {k: v.contiguous() for k, v in vae.state_dict().items()}


def write_tiny_models(models_dir, seed: int = 0) -> dict:
    """Write the tiny example models under a ComfyUI models folder; returns name -> path.

    diffusion_models/: an SD3.5-style MMDiT (depth 2, RMS qk-norm, MMDiT-X layer 0) and a
    detectable PixArt-Sigma (hidden 1152, depth 1); vae/: 16- and 4-channel TAESD VAEs;
    edit/: an untrained EDiT bank for each model. Every tensor comes from ``seed`` and the
    files are byte-identical for a seed, so existing files are kept.
    """
    models_dir = Path(models_dir)
    files = {
        TINY_SD35: (models_dir / "diffusion_models", lambda: sd3_state_dict(
            seed=seed, attention_gain=4.0, local_attention=True, dtype=torch.float16)),
        TINY_PIXART: (models_dir / "diffusion_models", lambda: pixart_state_dict(
            seed=seed, attention_gain=3.0, local_attention=True, dtype=torch.float16)),
        TINY_VAE16: (models_dir / "vae", lambda: taesd_state_dict(16, seed)),
        TINY_VAE4: (models_dir / "vae", lambda: taesd_state_dict(4, seed)),
    }
    paths = {}
    for name, (folder, build) in files.items():
        paths[name] = _write_once(folder / name, lambda tmp, build=build: save_file(build(), str(tmp)))
    for model, bank in ((TINY_SD35, TINY_BANKS["sd35"]), (TINY_PIXART, TINY_BANKS["pixart"])):
        def write_bank(tmp, model=model):
            patcher = comfy.sd.load_diffusion_model(str(paths[model]))
            save_bank(init_bank(model_spec(patcher), seed=seed), tmp)
        paths[bank] = _write_once(models_dir / "edit" / bank, write_bank)
    return paths


def _write_once(path: Path, write) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        write(tmp)
        _sort_header(tmp)
        tmp.replace(path)
    return path


def _sort_header(path: Path):
    """Rewrite a safetensors header with its keys sorted: safetensors writes the metadata in
    hash order, which differs from run to run, so equal files would not be equal bytes."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | dict(sorted(header.items()))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:
        raise RuntimeError(f"{path}: sorted safetensors header is longer than the original")
    data[8:8 + size] = text.ljust(size)
    path.write_bytes(bytes(data))


def random_conditioning(text: str, seed: int, tokens: int, context_dim: int, pooled_dim: int):
    """ComfyUI CONDITIONING of seeded random features, in place of a text encoder."""
    g = torch.Generator().manual_seed(zlib.crc32(text.encode()) ^ seed)
    cond = torch.randn(1, tokens, context_dim, generator=g)
    extra = {"pooled_output": torch.randn(1, pooled_dim, generator=g)} if pooled_dim > 0 else {}
    return [[cond, extra]]
