"""The fused steps in pure PyTorch: the twins of `step_triton.fused_layer_step` and
`step_triton.fused_mixer_step`, same signatures.

`naive_layer_step`: one token per series through a layer's mixers: the recurrent step, the slot
plan applied to the KV cache (a leaving attention-mode token moved to its pinned slot, then the new
key and value written), attention over the retained slots for every series, and the mode mix.
`naive_mixer_step` adds what comes before and after it in the mixer: from the token's projections,
the short convolutions over their tails, activations, L2 norms, gates and RoPE; after it, the
output gate (RMSNorm over each head, times silu(z)). Computed in fp32; the state, the cache and
the conv tails are updated in place, as the fused kernel does. Imports no triton.

Legend: B series, H heads, K key dim, V value dim, S cache slots, W conv width, X channels, N projections.
"""

import torch
import torch.nn.functional as F

from oryx_ts.kernels.attention.naive import routed_attention
from oryx_ts.kernels.attention.rope import rope
from oryx_ts.kernels.gdn.naive import gdn_step
from oryx_ts.kernels.mamba2.naive import ssd_step


def naive_layer_step(
    mixer: str,
    q_lin_BHK: torch.Tensor,
    k_BHK: torch.Tensor,
    v_BHV: torch.Tensor,
    g_BH: torch.Tensor,
    gate_BH: torch.Tensor,
    state_BHKV: torch.Tensor,
    *,
    q_att_BHK: torch.Tensor,
    k_att_BHK: torch.Tensor,
    k_cache_BSHK: torch.Tensor,
    v_cache_BSHV: torch.Tensor,
    write_slot_B: torch.Tensor,
    valid_BS: torch.Tensor,
    route_B: torch.Tensor,
    scale_H: torch.Tensor,
    pin_B: torch.Tensor | None = None,
    pin_slot_B: torch.Tensor | None = None,
    len_B: torch.Tensor | None = None,
    d_H: torch.Tensor | None = None,
    scale: float | None = None,
    out_BHV: torch.Tensor | None = None,
) -> torch.Tensor:
    """See `step_triton.fused_layer_step` for the arguments. Returns o_BHV in v's dtype."""
    if mixer == "gdn":
        o_lin, new_state = gdn_step(q_lin_BHK, k_BHK, v_BHV, g_BH, gate_BH, state_BHKV, scale=scale)
    elif mixer == "mamba2":
        v_in = v_BHV * gate_BH[..., None].to(v_BHV.dtype)
        o_lin, new_state = ssd_step(q_lin_BHK, k_BHK, v_in, g_BH, state_BHKV, scale=scale)
    else:
        raise ValueError(f"unknown mixer {mixer!r}; expected 'gdn' or 'mamba2'")
    if d_H is not None:
        o_lin = o_lin + d_H[:, None].to(o_lin.dtype) * v_BHV
    state_BHKV.copy_(new_state)

    B, S = valid_BS.shape
    rows = torch.arange(B, device=v_BHV.device)
    for cache, new in ((k_cache_BSHK, k_att_BHK), (v_cache_BSHV, v_BHV)):
        if pin_B is not None:
            moved = torch.where(pin_B[:, None, None], cache[rows, write_slot_B], cache[rows, pin_slot_B])
            cache[rows, pin_slot_B] = moved
        cache[rows, write_slot_B] = new.to(cache.dtype)

    valid = valid_BS if len_B is None else valid_BS & (torch.arange(S, device=valid_BS.device)[None] < len_B[:, None])
    zero = torch.zeros(1, dtype=torch.long, device=v_BHV.device)
    # every valid slot holds a past token of that series (or the new one): visibility is the slot mask alone
    o_att = routed_attention(
        q_att_BHK[:, None], k_cache_BSHK, v_cache_BSHV, q_pos_Tq=zero, k_pos_S=zero.expand(S), scale_H=scale_H,
        k_valid_BS=valid,
    )[:, 0].to(o_lin.dtype)
    m = route_B.to(o_lin.dtype)[:, None, None]
    o = torch.where(m == 1, o_att, m * o_att + (1 - m) * o_lin)
    if out_BHV is not None:
        out_BHV.copy_(o)
        return out_BHV
    return o


def _conv_tail(x_BX: torch.Tensor, tail_BWX: torch.Tensor, w_XW: torch.Tensor, b_X: torch.Tensor) -> torch.Tensor:
    """Short causal conv of one token over [tail, x] in fp32; the tail moves on by one token in place."""
    full = torch.cat([tail_BWX.float(), x_BX.float()[:, None]], 1)
    tail_BWX.copy_(full[:, 1:])
    return (full * w_XW.float().t()).sum(1) + b_X.float()


def _l2norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def naive_mixer_step(
    mixer: str,
    proj_BN: torch.Tensor,
    state_BHKV: torch.Tensor,
    *,
    tails: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    conv_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    conv_biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    a_log_H: torch.Tensor,
    dt_bias_H: torch.Tensor,
    o_norm_weight_V: torch.Tensor,
    o_norm_eps: float,
    pos_B: torch.Tensor | None,
    rope_base: float,
    l2_eps: float = 1e-6,
    **cache_kwargs,
) -> torch.Tensor:
    """One mixer step of B series from the token's projections; returns the gated output `(B, H * V)`.

    Args:
        proj_BN: the token's projections side by side: k (H*K) | v (H*V) | recurrent q (H*K) |
            attention q (H*K) | z (H*V) | a (gdn) or dt (mamba2) logits (H) | beta logits (H, gdn).
        state_BHKV: recurrent state in any float dtype, advanced in place (computed in fp32).
        tails: the (B, W-1, X) conv tails of k, v and the recurrent q, moved on in place.
        conv_weights, conv_biases: their (X, 1, W) depthwise weights and (X,) biases.
        a_log_H, dt_bias_H: the decay `-exp(a_log) * softplus(logit + dt_bias)`; mamba2 steps on dt * v.
        o_norm_weight_V, o_norm_eps: the per-head RMSNorm of the output, gated by silu(z).
        pos_B: token positions for RoPE on the attention query and key (None: no RoPE).
        cache_kwargs: the KV cache, slot plan, modes and `d_H` of `naive_layer_step`.
    """
    B, H, K, V = state_BHKV.shape
    HK, HV = H * K, H * V
    sizes = [HK, HV, HK, HK, HV, H] + ([H] if mixer == "gdn" else [])
    k_raw, v_raw, q_raw, qa_raw, z, a, *beta = proj_BN.float().split(sizes, -1)
    ys = [_conv_tail(x, t, w.reshape(w.shape[0], -1), bias)
          for x, t, w, bias in zip((k_raw, v_raw, q_raw), tails, conv_weights, conv_biases, strict=True)]
    if mixer == "gdn":
        ys = [F.silu(y) for y in ys]
    k = _l2norm(ys[0].view(B, H, K), l2_eps)
    v = ys[1].view(B, H, V)
    q = _l2norm(ys[2].view(B, H, K), l2_eps)
    qa = _l2norm(qa_raw.view(B, H, K), l2_eps)
    ka = k
    if pos_B is not None:  # per-series positions: the series axis stands in for rope's token axis
        ka = rope(k[None], pos_B, base=rope_base)[0]
        qa = rope(qa[None], pos_B, base=rope_base)[0]
    sp = F.softplus(a + dt_bias_H.float())
    g = -torch.exp(a_log_H.float()) * sp
    gate = torch.sigmoid(beta[0]) if mixer == "gdn" else sp
    o = naive_layer_step(mixer, q, k, v, g, gate, state_BHKV, q_att_BHK=qa, k_att_BHK=ka, **cache_kwargs)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + o_norm_eps) * o_norm_weight_V.float()
    return (o * F.silu(z.view(B, H, V))).reshape(B, HV).to(proj_BN.dtype)
