"""Routed causal softmax attention in pure PyTorch: the reference and the CPU path.

Only the routed queries are computed; each attends to every retained key at or before its own
position, whatever mode that key's token ran in. Work and memory follow the number of queries.

Legend: B batch, Tq routed queries, S retained keys, H heads, K key dim, V value dim.
"""

import torch


def routed_attention(
    q_BTqHK: torch.Tensor,
    k_BSHK: torch.Tensor,
    v_BSHV: torch.Tensor,
    *,
    q_pos_Tq: torch.Tensor,
    k_pos_S: torch.Tensor,
    scale_H: torch.Tensor,
    k_valid_BS: torch.Tensor | None = None,
    k_until_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of routed queries over retained keys.

    Args:
        q_BTqHK: queries of the routed tokens.
        k_BSHK, v_BSHV: retained keys and values.
        q_pos_Tq, k_pos_S: absolute token positions (int64); a key is visible to a query when
            `k_pos <= q_pos` (causal, the query's own key included).
        scale_H: per-head logit scale (the learnable temperature).
        k_valid_BS: optional mask of keys that exist (a bounded cache may have holes).
        k_until_BS: optional first query position (int64) at which each key is no longer
            retained (bounded retention evicts keys); a key is visible while `q_pos < k_until`.

    Returns:
        o_BTqHV in the dtype of `v`, computed in fp32.
    """
    dtype = v_BSHV.dtype
    logits_BHTqS = torch.einsum("bqhk,bshk->bhqs", q_BTqHK.float(), k_BSHK.float())
    logits_BHTqS = logits_BHTqS * scale_H.float()[None, :, None, None]
    visible = (k_pos_S[None, :] <= q_pos_Tq[:, None])[None, None]
    if k_valid_BS is not None:
        visible = visible & k_valid_BS[:, None, None, :]
    if k_until_BS is not None:
        visible = visible & (q_pos_Tq[None, :, None] < k_until_BS[:, None, :])[:, None]
    logits_BHTqS = logits_BHTqS.masked_fill(~visible, float("-inf"))
    p_BHTqS = torch.softmax(logits_BHTqS, dim=-1)
    o = torch.einsum("bhqs,bshv->bqhv", p_BHTqS, v_BSHV.float())
    return o.to(dtype)


def routed_inputs(
    k_BTHK: torch.Tensor,
    q_BTX: torch.Tensor,
    idx_Tq: torch.Tensor,
    pos_T: torch.Tensor,
    rope_base: float | None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed attention's inputs in a parallel forward, `(keys_BTHK, q_BTqHK)`.

    The keys rotated at their positions `pos_T` (RoPE at `rope_base`; None: no rotation), and the
    queries of the tokens at `idx_Tq`: rows of `q_BTX` (heads of width K side by side) gathered,
    L2-normalized per head (the block's norm, `x * rsqrt(sum(x^2) + eps)`) and rotated.
    """
    from oryx_ts.kernels.attention.rope import rope

    B, T, H, K = k_BTHK.shape
    q = q_BTX[:, idx_Tq].view(B, idx_Tq.numel(), H, K)
    q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + eps)
    if rope_base is None:
        return k_BTHK, q
    return rope(k_BTHK, pos_T, base=rope_base), rope(q, pos_T[idx_Tq], base=rope_base)
