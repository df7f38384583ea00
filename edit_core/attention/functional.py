"""EDiT attention math on (B, H, L, D) tensors: ReLU linear attention and the MM-EDiT hybrid.

The layers in layers.py read out through these functions; ``reference.py`` holds the float64
versions. No ComfyUI here: the patchers pass ComfyUI's attention in as ``softmax_attention``.
"""
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

SoftmaxAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Weight = Union[float, torch.Tensor]  # a float, or a (1 or B, H, 1, 1) tensor

EPS = 1e-6


def linear_attention_state(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The per-head (D x D+1) state [k^T v | k^T 1], in float32 (float64 for float64 inputs):
    a sum over 65k bf16 tokens would lose most of its bits. k and v have few (compressed)
    tokens: head-major contiguous copies make the reduction a fast batched GEMM."""
    acc = torch.promote_types(k.dtype, torch.float32)
    k, v = k.to(acc).contiguous(), v.to(acc).contiguous()
    # The normaliser rides along as an extra value column: one read-out matmul for both.
    return torch.cat((k.transpose(-1, -2) @ v, k.sum(-2).unsqueeze(-1)), dim=-1)


def read_out(q: torch.Tensor, state: torch.Tensor, eps: float = EPS) -> Tuple[torch.Tensor, torch.Tensor]:
    """(numerator, denominator) of linear attention of q over a state, in the state's dtype:
    q (k^T v) and q . k^T 1 + eps. No N x M tensor is formed."""
    out = q.to(state.dtype) @ state
    return out[..., :-1], out[..., -1:] + eps


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """out_i = q_i (sum_j k_j^T v_j) / (q_i . sum_j k_j + eps) in q's dtype; q and k are
    already non-negative features."""
    numerator, denominator = read_out(q, linear_attention_state(k, v), eps)
    return (numerator / denominator).to(q.dtype)


# The two row functions below go one batch at a time: the layers' q is a strided head view of
# (B, N, C) tokens, and a batched matmul would copy it whole to fold B and H into one dimension.

def add_linear_attention(acc: torch.Tensor, q: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """acc += linear attention of q over state, in place (the division and the sum in one pass)."""
    for i in range(q.shape[0]):
        acc[i].addcdiv_(*read_out(q[i], state[i]))
    return acc


def _per_batch(w: Weight, batches: int):
    """w for each batch; a (1, H, 1, 1) tensor is indexed once, so autograd sums its gradient
    over the batches in one place."""
    if not torch.is_tensor(w):
        return [w] * batches
    return [w[0]] * batches if w.shape[0] == 1 else w.unbind(0)


def _add_scaled(acc: torch.Tensor, t: torch.Tensor, weight: Weight) -> torch.Tensor:
    """acc += weight * t in place, for a float or a tensor weight."""
    return acc.addcmul_(t, weight) if torch.is_tensor(weight) else acc.add_(t, alpha=weight)


def mix_image_rows(out: torch.Tensor, q_lin: torch.Tensor, state: torch.Tensor, soft: torch.Tensor, eta: Weight,
                   rest: Weight, local: Optional[torch.Tensor] = None, local_weight: Weight = 1.0) -> torch.Tensor:
    """Image rows of MM-EDiT into out: eta * linear attention of q_lin over state + rest * soft
    (softmax of the image queries over the prompt) + local_weight * local. The sum runs in
    float32 in the read-out's own buffer and is rounded once; rest is passed, not 1 - eta,
    because 1 - eta from an eta near 1 (0.995 at 65536 image and 333 prompt tokens) loses
    most of its bits."""
    batches = q_lin.shape[0]
    weights = zip(*(_per_batch(w, batches) for w in (eta, rest, local_weight)), strict=True)
    for i, (eta_i, rest_i, local_weight_i) in enumerate(weights):
        numerator, denominator = read_out(q_lin[i], state[i])
        mix = numerator.mul_(eta_i / denominator)
        _add_scaled(mix, soft[i], rest_i)
        if local is not None:
            _add_scaled(mix, local[i], local_weight_i)
        out[i].copy_(mix)
    return out


def token_ratio_eta(n_img: int, n_txt: int) -> float:
    """The paper's approximation of the image-key share of attention mass: N / (N + M)."""
    return n_img / (n_img + n_txt)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def cat_tokens(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate (B, H, L, D) tensors along L. Head views of (B, L, H*D) tokens are joined
    in token layout (the result is again such a view): head-major would gather strided rows."""
    if a.stride(1) < a.stride(2) and b.stride(1) < b.stride(2):
        return torch.cat((a.transpose(1, 2), b.transpose(1, 2)), dim=1).transpose(1, 2)
    return torch.cat((a, b), dim=-2)


def prompt_rows(q_txt, k_txt, v_txt, k_img, v_img, softmax_attention: Optional[SoftmaxAttention] = None):
    """The original joint attention's prompt rows: softmax of q_txt over [k_txt; k_img]."""
    softmax_attention = softmax_attention or sdpa
    return softmax_attention(q_txt, cat_tokens(k_txt, k_img), cat_tokens(v_txt, v_img))


def mm_edit_attention(q_txt, k_txt, v_txt, q_img, k_img, v_img, q_lin, k_lin, v_lin,
                      eta: Optional[Weight] = None, softmax_attention: Optional[SoftmaxAttention] = None):
    """MM-EDiT hybrid attention for one joint layer, all (B, H, L, D): (prompt_rows, image rows
    of mix_image_rows without a local branch). eta=None means the token ratio. Returns
    (o_txt, o_img)."""
    softmax_attention = softmax_attention or sdpa
    if eta is None:
        n_img, n_txt = q_img.shape[-2], k_txt.shape[-2]
        eta, rest = token_ratio_eta(n_img, n_txt), n_txt / (n_img + n_txt)
    else:
        rest = 1 - eta
    soft = softmax_attention(q_img, k_txt, v_txt)
    o_img = mix_image_rows(torch.empty_like(soft), q_lin, linear_attention_state(k_lin, v_lin), soft, eta, rest)
    return prompt_rows(q_txt, k_txt, v_txt, k_img, v_img, softmax_attention), o_img
