"""Float64 references for functional.py and layers.py, written the slow obvious way (explicit
N x M similarities, convolutions as sums of shifted grid slices, GroupNorm from its
definition). Only the tests use them."""
import math

import torch
import torch.nn.functional as F


def _f64(*ts):
    return tuple(t.double() for t in ts)


def linear_attention_ref(q, k, v, eps=1e-6):
    """sum_j (q_i . k_j) v_j / (sum_j q_i . k_j + eps), with the (N, M) similarity formed."""
    q, k, v = _f64(q, k, v)
    sim = q @ k.transpose(-1, -2)
    return (sim @ v) / (sim.sum(-1, keepdim=True) + eps)


def softmax_attention_ref(q, k, v):
    q, k, v = _f64(q, k, v)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return (p / p.sum(-1, keepdim=True)) @ v


def mm_edit_attention_ref(q_txt, k_txt, v_txt, q_img, k_img, v_img, q_lin, k_lin, v_lin, eta=None):
    if eta is None:
        eta = q_img.shape[-2] / (q_img.shape[-2] + k_txt.shape[-2])
    if torch.is_tensor(eta):
        eta = eta.double()
    o_txt = softmax_attention_ref(q_txt, torch.cat((k_txt, k_img), -2), torch.cat((v_txt, v_img), -2))
    o_img = eta * linear_attention_ref(q_lin, k_lin, v_lin) + (1 - eta) * softmax_attention_ref(q_img, k_txt, v_txt)
    return o_txt, o_img


def conv2d_ref(x, weight, bias, stride=1, padding=0, groups=1, pad_mode="zeros"):
    """x (B, C, h, w); out[o, i, j] = bias[o] + sum_{c, di, dj} w[o, c, di, dj] x[c, s*i+di-p, s*j+dj-p]."""
    x, weight = _f64(x, weight)
    b, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    if pad_mode == "replicate":
        rows = torch.arange(-padding, h + padding).clamp(0, h - 1)
        cols = torch.arange(-padding, w + padding).clamp(0, w - 1)
        xp = x[:, :, rows][:, :, :, cols]
    else:
        xp = torch.zeros(b, c, h + 2 * padding, w + 2 * padding, dtype=x.dtype)
        xp[:, :, padding:padding + h, padding:padding + w] = x
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    og = o // groups
    out = torch.zeros(b, o, ho, wo, dtype=x.dtype)
    for g in range(groups):
        xg = xp[:, g * cg:(g + 1) * cg]
        wg = weight[g * og:(g + 1) * og]
        for di in range(kh):
            for dj in range(kw):
                patch = xg[:, :, di:di + stride * (ho - 1) + 1:stride, dj:dj + stride * (wo - 1) + 1:stride]
                out[:, g * og:(g + 1) * og] += torch.einsum("bchw,oc->bohw", patch, wg[:, :, di, dj])
    if bias is not None:
        out = out + bias.double().view(1, -1, 1, 1)
    return out


def group_norm_ref(x, groups, weight, bias, eps):
    x = x.double()
    b, c = x.shape[:2]
    xg = x.reshape(b, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    xn = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    return xn * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)


def _grid(x, grid):
    b, n, c = x.shape
    return x.double().reshape(b, grid[0], grid[1], c).permute(0, 3, 1, 2)


def _tokens(g):
    return g.permute(0, 2, 3, 1).reshape(g.shape[0], -1, g.shape[1])


def conv_fusion_ref(cf, x, grid):
    g = conv2d_ref(_grid(x, grid), cf.conv.weight, cf.conv.bias, padding=cf.conv.padding[0])
    g = group_norm_ref(g, cf.norm.num_groups, cf.norm.weight, cf.norm.bias, cf.norm.eps)
    g = F.leaky_relu(g, cf.negative_slope)
    return _tokens(g) @ cf.proj.weight.double().T + cf.proj.bias.double()


def spatial_compressor_ref(sc, x, grid):
    g = _grid(x, grid)
    return _tokens(conv2d_ref(g, sc.weight, sc.bias, stride=sc.stride, padding=sc.kernel_size // 2,
                              groups=g.shape[1], pad_mode="replicate"))


def _heads(x, heads):
    b, n, c = x.shape
    return x.double().reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)


def _merge(x):
    b, h, n, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * d)


def low_rank_qkv_ref(update, h):
    """(dq, dk, dv): B_j (A_j h) for j = q, k, v."""
    z = h.double() @ update.down.double().T
    return tuple(part @ update.up[j].double().T for j, part in enumerate(z.chunk(3, dim=-1)))


def updated_qkv_ref(layer, h, q, k, v):
    q, k, v = _f64(q, k, v)
    if layer.qkv_update is None:
        return q, k, v
    dq, dk, dv = low_rank_qkv_ref(layer.qkv_update, h)
    return q + dq, k + dk, v + dv


def edit_features_ref(layer, x, q, k, v, grid):
    q_lin = torch.relu(q.double() if layer.cf is None else q.double() + conv_fusion_ref(layer.cf, x, grid))
    k_lin = torch.relu(spatial_compressor_ref(layer.sc_k, k, grid))
    v_lin = spatial_compressor_ref(layer.sc_v, v, grid)
    return tuple(_heads(t, layer.heads) for t in (q_lin, k_lin, v_lin))


def local_value_ref(local, v, grid):
    g = _grid(v, grid)
    return _tokens(conv2d_ref(g, local.weight, local.bias, padding=local.weight.shape[-1] // 2, groups=g.shape[1]))


def local_branch_ref(layer, v, grid):
    """(B, H, N, D): the local branch, zero without one."""
    if layer.local is None:
        return torch.zeros_like(_heads(v, layer.heads))
    return _heads(local_value_ref(layer.local, v, grid), layer.heads)


def edit_image_image_ref(layer, x, q, k, v, grid):
    """(B, H, N, D): linear attention over (relu(q + CF(x)), relu(SC(k)), SC(v)) plus the local branch."""
    return linear_attention_ref(*edit_features_ref(layer, x, q, k, v, grid)) + local_branch_ref(layer, v, grid)


def edit_attention_ref(layer, x, q, k, v, grid, h=None):
    """EDiTAttention in float64 (h: the qkv projection's input, None means x)."""
    q, k, v = updated_qkv_ref(layer, x if h is None else h, q, k, v)
    return _merge(edit_image_image_ref(layer, x, q, k, v, grid))


def hybrid_attention_ref(layer, x, q_txt, k_txt, v_txt, q, k, v, grid, h=None):
    """HybridEDiTAttention in float64; returns (o_txt, o_img) as (B, L, C)."""
    q, k, v = updated_qkv_ref(layer, x if h is None else h, q, k, v)
    n_img, n_txt = q.shape[1], q_txt.shape[1]
    ratio = n_img / (n_img + n_txt)
    eta = ratio
    if layer.eta_offset is not None:
        eta = torch.sigmoid(math.log(ratio / (1 - ratio)) + layer.eta_offset.double()).view(1, -1, 1, 1)
    qt, kt, vt, qi, ki, vi = [_heads(t, layer.heads) for t in (q_txt, k_txt, v_txt, q, k, v)]
    o_txt = softmax_attention_ref(qt, torch.cat((kt, ki), -2), torch.cat((vt, vi), -2))
    linear = linear_attention_ref(*edit_features_ref(layer, x, q, k, v, grid))
    local = local_branch_ref(layer, v, grid)
    soft = softmax_attention_ref(qi, kt, vt)
    if layer.local_placement == "inside":
        o_img = eta * (linear + local) + (1 - eta) * soft
    else:
        o_img = eta * linear + (1 - eta) * soft + local
    return _merge(o_txt), _merge(o_img)
