"""EDiT layers as nn.Modules built from plain hyper-parameters; their attention read-outs are
functional.py's.

Token tensors are (B, N, C) with N = h * w tokens in row-major grid order. A (B, N, C)
tensor viewed as (B, h, w, C) and permuted to (B, C, h, w) *is* a channels-last image, so
the convolutions below run on the grid without copying it. Parameters are kept in their
own dtype (float32 for a bank) and cast to the activations' dtype and device per call, the
way ComfyUI's manual-cast ops do, so one bank serves fp32, fp16 and bf16 models.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import (SoftmaxAttention, add_linear_attention, linear_attention_state, mix_image_rows, sdpa,
                         token_ratio_eta)
from .functional import prompt_rows as joint_prompt_rows

Grid = Tuple[int, int]

DEFAULT_REDUCTION = 32


def _cast(p: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    return None if p is None else p.to(dtype=like.dtype, device=like.device)


def tokens_to_grid(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w) channels-last view (no copy)."""
    b, n, c = x.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"token grid {h}x{w} does not match {n} tokens")
    return x.reshape(b, h, w, c).permute(0, 3, 1, 2)


def grid_to_tokens(g: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C); free when g is channels-last."""
    b, c = g.shape[:2]
    return g.permute(0, 2, 3, 1).reshape(b, -1, c)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D) view."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H*D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class ConvFusion(nn.Module):
    """ConvFusion query branch, added to the model's own q (docs/design.md section 1): tokens ->
    grid -> 3x3 conv C_in -> C_in/r -> GroupNorm -> LeakyReLU -> 1x1 conv C_in/r -> C_out
    (zero-initialised, a Linear on the tokens) -> tokens."""

    def __init__(self, in_channels: int, out_channels: int, reduction: int = DEFAULT_REDUCTION,
                 kernel_size: int = 3, negative_slope: float = 0.01):
        super().__init__()
        hidden = max(2, in_channels // reduction)
        # Up to 8 groups of at least four channels: on a 1 x 1 grid a group of two values
        # can have a near-zero variance, which normalisation turns into noise.
        groups = next(g for g in (8, 4, 2, 1) if hidden % g == 0 and (hidden // g >= 4 or g == 1))
        self.negative_slope = negative_slope
        self.conv = nn.Conv2d(in_channels, hidden, kernel_size, padding=kernel_size // 2)
        self.norm = nn.GroupNorm(groups, hidden, eps=1e-6)
        self.proj = nn.Linear(hidden, out_channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        g = tokens_to_grid(x, grid)
        g = F.conv2d(g, _cast(self.conv.weight, g), _cast(self.conv.bias, g), padding=self.conv.padding)
        g = F.group_norm(g, self.norm.num_groups, _cast(self.norm.weight, g), _cast(self.norm.bias, g), self.norm.eps)
        g = F.leaky_relu(g, self.negative_slope)
        t = grid_to_tokens(g)
        return F.linear(t, _cast(self.proj.weight, t), _cast(self.proj.bias, t))


def binomial_kernel(size: int = 3) -> torch.Tensor:
    """Normalised binomial low-pass (size x size, sums to 1): [1,2,1]x[1,2,1]/16 for 3."""
    row = torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float64)
    k = torch.outer(row, row)
    return (k / k.sum()).float()


class SpatialCompressor(nn.Module):
    """Depthwise k x k conv (k odd), stride 2 or 1, over the token grid with k//2 replicate
    padding: any h, w >= 1 gives ceil(h/s) x ceil(w/s) tokens. Starts as a normalised binomial
    low-pass (docs/design.md section 1); k = 1, stride 1 is a per-channel scale and shift that
    starts as the identity."""

    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 2):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"SpatialCompressor kernel size must be odd, got {kernel_size}")
        if stride not in (1, 2):
            raise ValueError(f"SpatialCompressor stride must be 1 or 2, got {stride}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.weight = nn.Parameter(binomial_kernel(kernel_size).expand(channels, 1, kernel_size, kernel_size).clone())
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        p = self.kernel_size // 2
        if self.stride == 1 and p == 0:  # a per-channel scale and shift: no grid needed
            return torch.addcmul(_cast(self.bias, x), x, _cast(self.weight, x).view(-1))
        g = tokens_to_grid(x, grid)
        w, b = _cast(self.weight, g), _cast(self.bias, g)
        h, wd = grid
        if self.stride == 1:
            return grid_to_tokens(F.conv2d(F.pad(g, (p, p, p, p), mode="replicate"), w, b, groups=g.shape[1]))
        edge = (p + 1) // 2  # output rows/columns whose window reaches past the grid's start
        if min(h, wd) < 4 * p + 2:
            return grid_to_tokens(F.conv2d(F.pad(g, (p, p, p, p), mode="replicate"), w, b, stride=2, groups=g.shape[1]))
        # Replicate-padding the whole grid would copy it; instead convolve with the conv's own
        # zero padding and redo the few border rows/columns from small replicate-padded strips.
        out = F.conv2d(g, w, b, stride=2, padding=p, groups=g.shape[1])
        oh, ow = out.shape[-2:]
        n = 2 * (edge - 1) + p + 1  # input rows feeding the first `edge` output rows
        strips = [  # (output slice, input strip, its padding (left, right, top, bottom)): top, left
            ((slice(0, edge), slice(None)), g[..., :n, :], (p, p, p, 0)),
            ((slice(None), slice(0, edge)), g[..., :, :n], (p, 0, p, p)),
        ]
        last_h, last_w = 2 * (oh - 1), 2 * (ow - 1)  # input centre of the last output row/column
        tail_h, tail_w = max(0, last_h + p - (h - 1)), max(0, last_w + p - (wd - 1))
        if tail_h:
            k = (tail_h + 1) // 2
            start = 2 * (oh - k) - p
            strips.append(((slice(oh - k, oh), slice(None)), g[..., start:, :], (p, p, 0, tail_h)))  # bottom
        if tail_w:
            k = (tail_w + 1) // 2
            start = 2 * (ow - k) - p
            strips.append(((slice(None), slice(ow - k, ow)), g[..., :, start:], (0, tail_w, p, p)))  # right
        for (rows, cols), strip, pad in strips:
            fixed = F.conv2d(F.pad(strip, pad, mode="replicate"), w, b, stride=2, groups=g.shape[1])
            out[..., rows, cols] = fixed
        return grid_to_tokens(out)


class LocalValueConv(nn.Module):
    """Depthwise k x k conv (stride 1) over the value grid, added to the linear attention output
    (the local value branch of docs/design.md section 1). Zero-initialised: an untrained layer
    is plain linear attention."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"LocalValueConv kernel size must be odd, got {kernel_size}")
        self.weight = nn.Parameter(torch.zeros(channels, 1, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, v: torch.Tensor, grid: Grid) -> torch.Tensor:
        # v is often a strided view (inside a fused qkv output); the depthwise conv is several
        # times faster on a dense channels-last grid than the copy costs.
        g = tokens_to_grid(v.contiguous(), grid)
        g = F.conv2d(g, _cast(self.weight, g), _cast(self.bias, g), padding=self.weight.shape[-1] // 2,
                     groups=g.shape[1])
        return grid_to_tokens(g)


class LowRankQKV(nn.Module):
    """The ``qkv_rank`` update of docs/design.md section 3: (dq, dk, dv) = (B_j A_j h) for j = q,
    k, v, with h the input of the model's qkv projection, A: C_in -> r (nn.Linear's init) and
    B: r -> C (zero-initialised: an untrained update is no update). It is added to the
    normalised q, k, v that ComfyUI hands the attention."""

    def __init__(self, in_channels: int, channels: int, rank: int):
        super().__init__()
        self.down = nn.Parameter(torch.empty(3 * rank, in_channels))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.up = nn.Parameter(torch.zeros(3, channels, rank))

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = F.linear(h, _cast(self.down, h))
        up = _cast(self.up, h)
        return tuple(F.linear(part, up[j]) for j, part in enumerate(z.chunk(3, dim=-1)))


class EDiTAttention(nn.Module):
    """Linear compressed attention for one image self-attention layer.

    Given the ConvFusion input x (B, N, C_in), the model's own q, k, v (B, N, C) after its
    q/k norm, and the token grid: q~ = ReLU(q + CF(x)), k~ = ReLU(SC(k)), v~ = SC(v); the output
    is ReLU linear attention of q~ over k~, v~, heads merged, plus LocalValueConv(v): (B, N, C).
    Untrained (zero ConvFusion and local branch), it is plain ReLU linear attention over q and
    the compressed k, v. Options: ``cf_kernel=0`` drops ConvFusion (q~ = ReLU(q));
    ``sc_stride=1`` with ``sc_kernel=1`` leaves k, v uncompressed; ``qkv_rank=r > 0`` adds a
    ``LowRankQKV`` update to q, k, v first, read from h (the qkv projection's input).
    """

    def __init__(self, channels: int, heads: int, in_channels: Optional[int] = None,
                 reduction: int = DEFAULT_REDUCTION, cf_kernel: int = 3, sc_kernel: int = 3, local_kernel: int = 3,
                 sc_stride: int = 2, qkv_rank: int = 0):
        super().__init__()
        self.heads = heads
        self.cf = ConvFusion(in_channels or channels, channels, reduction, cf_kernel) if cf_kernel else None
        self.sc_k = SpatialCompressor(channels, sc_kernel, sc_stride)
        self.sc_v = SpatialCompressor(channels, sc_kernel, sc_stride)
        self.local = LocalValueConv(channels, local_kernel) if local_kernel else None  # 0: plain EDiT
        self.qkv_update = LowRankQKV(in_channels or channels, channels, qkv_rank) if qkv_rank else None

    def updated_qkv(self, h, q, k, v):
        """q, k, v plus the low-rank update read from h; unchanged (the same tensors) without one."""
        if self.qkv_update is None:
            return q, k, v
        dq, dk, dv = self.qkv_update(h)
        return q + dq, k + dk, v + dv

    def features(self, x, q, k, v, grid: Grid):
        """(q~, k~, v~) as (B, H, L, D); k~ and v~ on the compressed grid."""
        # In place on fresh outputs whose producers do not keep them for backward: no extra
        # full-size tensors.
        q_lin = q.relu() if self.cf is None else self.cf(x, grid).add_(q).relu_()
        k_lin = self.sc_k(k, grid).relu_()
        v_lin = self.sc_v(v, grid)
        return tuple(split_heads(t, self.heads) for t in (q_lin, k_lin, v_lin))

    def forward(self, x, q, k, v, grid: Grid, h=None) -> torch.Tensor:
        """h: the input of the model's qkv projection, read by the low-rank update; None means x.
        Linear attention is added in place into the local branch's (B, N, C) output, so nothing
        is transposed or copied on the way out."""
        q, k, v = self.updated_qkv(x if h is None else h, q, k, v)
        q_lin, k_lin, v_lin = self.features(x, q, k, v, grid)
        state = linear_attention_state(k_lin, v_lin)
        local = v.new_zeros(v.shape) if self.local is None else self.local(v, grid)
        add_linear_attention(split_heads(local, self.heads), q_lin, state)
        return local


LOCAL_PLACEMENTS = ("inside", "outside")


class HybridEDiTAttention(EDiTAttention):
    """MM-EDiT hybrid attention for one SD3 joint (prompt + image) layer.

    Image-image interactions use the EDiT features; every interaction with prompt tokens
    stays softmax. eta is the token ratio N / (N + M); with ``eta_mode="learned"`` a per-head
    offset on its logit (zero-initialised, so training starts at the token ratio) is learned
    by distillation. The local branch sits inside the eta-weighted term (``local_placement=
    "inside"``: eta * (linear + local) + (1 - eta) * soft) or outside it ("outside": eta *
    linear + (1 - eta) * soft + local, a strength that does not change with resolution).
    """

    def __init__(self, channels: int, heads: int, in_channels: Optional[int] = None,
                 reduction: int = DEFAULT_REDUCTION, eta_mode: str = "learned", cf_kernel: int = 3,
                 sc_kernel: int = 3, local_kernel: int = 3, sc_stride: int = 2, qkv_rank: int = 0,
                 local_placement: str = "inside"):
        super().__init__(channels, heads, in_channels, reduction, cf_kernel, sc_kernel, local_kernel, sc_stride,
                         qkv_rank)
        if eta_mode not in ("ratio", "learned"):
            raise ValueError(f"eta_mode must be 'ratio' or 'learned', got {eta_mode!r}")
        if local_placement not in LOCAL_PLACEMENTS:
            raise ValueError(f"local_placement must be one of {LOCAL_PLACEMENTS}, got {local_placement!r}")
        self.eta_mode = eta_mode
        self.local_placement = local_placement
        self.eta_offset = nn.Parameter(torch.zeros(heads)) if eta_mode == "learned" else None

    def mix_weights(self, n_img: int, n_txt: int):
        """(eta, 1 - eta): floats, or float32 (1, H, 1, 1) tensors with a learned offset; 1 - eta
        is sigmoid(-logit), not rounded from eta (see mix_image_rows)."""
        ratio = token_ratio_eta(n_img, n_txt)
        if self.eta_offset is None:
            return ratio, n_txt / (n_img + n_txt)
        offset = self.eta_offset.to(torch.promote_types(self.eta_offset.dtype, torch.float32))  # float64 stays
        logit = math.log(ratio / (1.0 - ratio)) + offset
        return torch.sigmoid(logit).view(1, -1, 1, 1), torch.sigmoid(-logit).view(1, -1, 1, 1)

    def image_rows(self, x, q, k, v, grid: Grid, soft: torch.Tensor, eta, rest) -> torch.Tensor:
        """The image rows (B, N, C) in v's dtype: mix_image_rows with the local branch times eta
        (inside) or alone (outside)."""
        q_lin, k_lin, v_lin = self.features(x, q, k, v, grid)
        state = linear_attention_state(k_lin, v_lin)
        local = None if self.local is None else split_heads(self.local(v, grid), self.heads)
        local_weight = eta if self.local_placement == "inside" else 1.0
        out = v.new_empty(v.shape)
        mix_image_rows(split_heads(out, self.heads), q_lin, state, soft, eta, rest, local, local_weight)
        return out

    def forward(self, x, q_txt, k_txt, v_txt, q, k, v, grid: Grid,
                softmax_attention: Optional[SoftmaxAttention] = None, prompt_rows: bool = True, h=None):
        """All token tensors (B, L, C); h: the input of the model's image qkv projection, read
        by the low-rank update (None means x). Returns (o_txt, o_img) as (B, L, C); o_txt is
        None when ``prompt_rows`` is False (SD3's last block has no prompt output)."""
        softmax_attention = softmax_attention or sdpa
        q, k, v = self.updated_qkv(x if h is None else h, q, k, v)
        qt, kt, vt, qi, ki, vi = (split_heads(t, self.heads) for t in (q_txt, k_txt, v_txt, q, k, v))
        eta, rest = self.mix_weights(q.shape[1], q_txt.shape[1])
        o_img = self.image_rows(x, q, k, v, grid, softmax_attention(qi, kt, vt), eta, rest)
        o_txt = merge_heads(joint_prompt_rows(qt, kt, vt, ki, vi, softmax_attention)) if prompt_rows else None
        return o_txt, o_img
