"""EDiT attention math: ReLU linear attention and the MM-EDiT hybrid.

Plain functions on (B, H, L, D) tensors. No ComfyUI import here; the patchers pass
ComfyUI's own attention function in as ``softmax_attention``. Float64 references written
the slow obvious way live in ``edit_core.attention.reference``.
"""
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

SoftmaxAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Eta = Union[None, float, torch.Tensor]


EPS = 1e-6


def linear_attention_state(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The per-head (D x D+1) state [k^T v | k^T 1] of linear attention, in float32 (float64
    for float64 inputs). k and v have few (compressed) tokens: head-major contiguous copies
    of them are cheap and make the reduction over tokens a fast batched GEMM."""
    acc = torch.promote_types(k.dtype, torch.float32)
    k, v = k.to(acc).contiguous(), v.to(acc).contiguous()
    # The normaliser rides along as an extra value column: one read-out matmul for both.
    return torch.cat((k.transpose(-1, -2) @ v, k.sum(-2).unsqueeze(-1)), dim=-1)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """out_i = q_i (sum_j k_j^T v_j) / (q_i . sum_j k_j + eps).

    q (B, H, N, D), k and v (B, H, M, D); q and k are already non-negative features.
    The (D x D) state and the normaliser are accumulated in float32 (float64 for float64
    inputs) whatever the input dtype: a sum over 65k bf16 tokens would lose most of its
    bits. The result has q's dtype. Memory is O((N + M) * D): no N x M tensor is formed.
    """
    state = linear_attention_state(k, v)
    out = q.to(state.dtype) @ state
    return (out[..., :-1] / (out[..., -1:] + eps)).to(q.dtype)


def token_ratio_eta(n_img: int, n_txt: int) -> float:
    """The paper's approximation of the image-key share of attention mass: N / (N + M)."""
    return n_img / (n_img + n_txt)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def cat_tokens(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate (B, H, L, D) tensors along L. Head views of (B, L, H*D) tokens are joined
    in token layout (contiguous rows; the result is again such a view): joining them
    head-major would gather every row with strides."""
    if a.stride(1) < a.stride(2) and b.stride(1) < b.stride(2):
        return torch.cat((a.transpose(1, 2), b.transpose(1, 2)), dim=1).transpose(1, 2)
    return torch.cat((a, b), dim=-2)


def prompt_rows(q_txt, k_txt, v_txt, k_img, v_img, softmax_attention: Optional[SoftmaxAttention] = None):
    """The original joint attention's prompt rows: softmax of q_txt over [k_txt; k_img]."""
    softmax_attention = softmax_attention or sdpa
    return softmax_attention(q_txt, cat_tokens(k_txt, k_img), cat_tokens(v_txt, v_img))


def mix_image_rows(q_img, k_txt, v_txt, image_image: torch.Tensor, eta: Eta = None,
                   softmax_attention: Optional[SoftmaxAttention] = None) -> torch.Tensor:
    """Image rows of MM-EDiT: eta * image_image + (1 - eta) * Softmax(q_img, k_txt, v_txt), where
    image_image is the image-image interaction (EDiT's linear attention). The mix runs in
    float32 (float64 for float64 inputs): eta near 1 (0.995 at 65536 image and 333 prompt
    tokens) rounded to bf16 makes the prompt weight 1 - eta wrong by tens of percent."""
    softmax_attention = softmax_attention or sdpa
    if eta is None:
        eta = token_ratio_eta(q_img.shape[-2], k_txt.shape[-2])
    soft = softmax_attention(q_img, k_txt, v_txt)
    acc = torch.promote_types(soft.dtype, torch.float32)
    weight = eta.to(acc) if torch.is_tensor(eta) else eta
    return torch.lerp(soft.to(acc), image_image.to(acc), weight).to(soft.dtype)


def mm_edit_attention(q_txt, k_txt, v_txt, q_img, k_img, v_img, q_lin, k_lin, v_lin,
                      eta: Eta = None, softmax_attention: Optional[SoftmaxAttention] = None):
    """MM-EDiT hybrid attention for one joint (prompt + image) layer.

    All (B, H, L, D). Prompt rows are the original joint attention's rows: softmax of q_txt
    over [k_txt; k_img]. Image rows: eta * linear_attention(q_lin, k_lin, v_lin) + (1 - eta) *
    softmax of q_img over the prompt's k_txt, v_txt. eta=None means the token ratio
    N_img / (N_img + N_txt); a float or a tensor broadcastable to (B, H, 1, 1) otherwise.
    ``softmax_attention(q, k, v)`` runs the softmax parts (scale 1/sqrt(D)); None means
    PyTorch SDPA. Returns (o_txt, o_img).
    """
    o_txt = prompt_rows(q_txt, k_txt, v_txt, k_img, v_img, softmax_attention)
    o_img = mix_image_rows(q_img, k_txt, v_txt, linear_attention(q_lin, k_lin, v_lin), eta, softmax_attention)
    return o_txt, o_img
