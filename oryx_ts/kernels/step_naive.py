"""The fused layer step in pure PyTorch: the twin of `step_triton.fused_layer_step`, same signature.

One token per series through a layer's mixers: the recurrent step, the slot plan applied to the
KV cache (a leaving attention-mode token moved to its pinned slot, then the new key and value
written), attention over the retained slots for every series, and the mode mix. Computed in fp32;
the state and the cache are updated in place, as the fused kernel does. Imports no triton.

Legend: B series, H heads, K key dim, V value dim, S cache slots.
"""

import torch

from oryx_ts.kernels.attention.naive import routed_attention
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
