"""Gated DeltaNet on the GPU through fla: the chunked kernel for training and prefill, the fused
recurrence for token steps. Same contract as `naive.py`; fla is imported on first call only.

Legend: B batch, T tokens, H heads, K key dim, V value dim.
"""

import torch

# fla's fused recurrence faults (illegal memory access) at 16384 series x 8 heads of 64x64 state;
# 2048 series a launch stays well inside the sizes it was measured to handle.
FUSED_RECURRENT_MAX_BATCH = 2048


def fla_chunk_gdn(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fla `chunk_gated_delta_rule` (chunk 64). Returns `(o_BTHV, final_state_BHKV fp32)`; differentiable.

    q, k, v are cast to v's dtype; g stays fp32 (decays are cumulated in fp32 inside fla).
    """
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    dtype = v_BTHV.dtype
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, state = chunk_gated_delta_rule(
        q_BTHK.to(dtype).contiguous(),
        k_BTHK.to(dtype).contiguous(),
        v_BTHV.contiguous(),
        g_BTH.float().contiguous(),
        beta_BTH.contiguous(),
        scale=scale,
        initial_state=h0,
        output_final_state=True,
    )
    return o, state


def fla_fused_recurrent_gdn(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    max_batch: int = FUSED_RECURRENT_MAX_BATCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fla `fused_recurrent_gated_delta_rule`, launched over slices of at most `max_batch` series.

    Forward only (fla has no backward for it). Returns `(o_BTHV, final_state_BHKV fp32)`.
    """
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    dtype = v_BTHV.dtype
    B = q_BTHK.shape[0]
    outs, states = [], []
    for b0 in range(0, B, max_batch):
        sl = slice(b0, min(B, b0 + max_batch))
        h0 = None if initial_state is None else initial_state[sl].float().contiguous()
        o, s = fused_recurrent_gated_delta_rule(
            q_BTHK[sl].to(dtype).contiguous(),
            k_BTHK[sl].to(dtype).contiguous(),
            v_BTHV[sl].contiguous(),
            g=g_BTH[sl].float().contiguous(),
            beta=beta_BTH[sl].contiguous(),  # by keyword: the positional slot after g is gk
            scale=scale,
            initial_state=h0,
            output_final_state=True,
        )
        outs.append(o)
        states.append(s)
    if len(outs) == 1:
        return outs[0], states[0]
    return torch.cat(outs), torch.cat(states)
