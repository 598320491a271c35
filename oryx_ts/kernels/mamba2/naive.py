"""Mamba-2 (SSD) in pure PyTorch: the ground truth and the CPU path.

SSD with one scalar decay per head is a gated linear attention: with C the query, B the key,
x * dt the value and dt * A the log decay, Mamba-2's scan is
    S <- exp(g) * S + k v^T
    o  = scale * q^T S
The `D * x` skip connection belongs to the module, not to this op. Ops take already-projected
tensors in fla's layout and compute in fp32.

Legend: B batch, T tokens, H heads, K state (key) dim, V head (value) dim.
    q_BTHK, k_BTHK, v_BTHV, g_BTH (log decay, <= 0), state_BHKV
"""

import torch
import torch.nn.functional as F


def naive_recurrent_ssd(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token SSD. Returns `(o_BTHV, final_state_BHKV)`; the state is fp32."""
    dtype = v_BTHV.dtype
    B, T, H, K = k_BTHK.shape
    V = v_BTHV.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q, k, v, g = (t.float() for t in (q_BTHK, k_BTHK, v_BTHV, g_BTH))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float().clone()
    o = q.new_zeros(B, T, H, V)
    for t in range(T):
        o[:, t], S = ssd_step(q[:, t], k[:, t], v[:, t], g[:, t], S, scale=scale)
    return o.to(dtype), S


def ssd_step(
    q_BHK: torch.Tensor,
    k_BHK: torch.Tensor,
    v_BHV: torch.Tensor,
    g_BH: torch.Tensor,
    state_BHKV: torch.Tensor,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the scan. Returns `(o_BHV, new_state_BHKV)`; does not modify its inputs."""
    scale = q_BHK.shape[-1] ** -0.5 if scale is None else scale
    S = state_BHKV.float() * g_BH.float().exp()[..., None, None]
    S = S + k_BHK.float()[..., :, None] * v_BHV.float()[..., None, :]
    o_BHV = torch.einsum("bhk,bhkv->bhv", q_BHK.float() * scale, S)
    return o_BHV.to(v_BHV.dtype), S


GROUP = 64  # chunks whose boundary states are computed in one weighted sum


def chunk_decay_sums(a_BHN: torch.Tensor) -> torch.Tensor:
    """`(B, H, N + 1, N + 1)` log decays between chunk boundaries: entry `[n, j]` sums `a` over chunks `j .. n - 1`.

    Boundary n is the state before chunk n (n = N: the final state). Entries with j > n are -inf.
    Each entry is a masked cumulative sum of the chunks in between, never a difference of two long
    cumulative sums, so it keeps fp32 precision however long the stream.
    """
    N = a_BHN.shape[-1]
    tril = torch.ones(N + 1, N + 1, dtype=torch.bool, device=a_BHN.device).tril()
    # row i carries a[i - 1]; the cumulative sum down column j then sums a[j .. n - 1] at row n
    rows = F.pad(a_BHN, (1, 0))[..., :, None].expand(*a_BHN.shape[:-1], N + 1, N + 1)
    segment = rows.masked_fill(~tril.tril(-1), 0.0).cumsum(-2)
    return segment.masked_fill(~tril, float("-inf"))


def naive_chunk_ssd(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD (quadratic inside a chunk, recurrent across chunks); same contract as the recurrence.

    The recurrence across chunks is linear with scalar decays, so the state at every chunk boundary
    is one weighted sum of the chunks' own contributions (`chunk_decay_sums`), with no loop over
    chunks: at the lengths training uses, small ops, not arithmetic, are what a CPU pays for.
    """
    dtype = v_BTHV.dtype
    B, T, H, K = k_BTHK.shape
    V = v_BTHV.shape[-1]
    C = min(chunk_size, T)
    scale = K**-0.5 if scale is None else scale
    pad = (-T) % C
    q, k, v = (F.pad(t.float().transpose(1, 2), (0, 0, 0, pad)) for t in (q_BTHK, k_BTHK, v_BTHV))
    g = F.pad(g_BTH.float().transpose(1, 2), (0, pad))
    N = (T + pad) // C
    q = q.reshape(B, H, N, C, K) * scale
    k = k.reshape(B, H, N, C, K)
    v = v.reshape(B, H, N, C, V)
    gcum = g.reshape(B, H, N, C).cumsum(-1)
    g_last = gcum[..., -1]

    tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay_CC = (gcum[..., :, None] - gcum[..., None, :]).masked_fill(~tril, float("-inf")).exp()
    attn_intra = q @ k.transpose(-1, -2) * decay_CC

    # each chunk's own contribution to the state at its end, then the states at every boundary,
    # GROUP chunks at a time (the weights are quadratic in the chunks they span)
    k_decayed = k * (g_last[..., None] - gcum).exp()[..., None]
    parts = k_decayed.transpose(-1, -2) @ v  # (B, H, N, K, V)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    starts = []
    for n0 in range(0, N, GROUP):
        weights = chunk_decay_sums(g_last[:, :, n0 : n0 + GROUP]).exp()[..., 1:, :]
        S_group = torch.einsum("bhnj,bhjkv->bhnkv", weights, torch.cat([S[:, :, None], parts[:, :, n0 : n0 + GROUP]], dim=2))
        starts += [S[:, :, None], S_group[:, :, :-1]]
        S = S_group[:, :, -1]
    S_start = torch.cat(starts, dim=2)  # the state before each chunk

    o = (q * gcum.exp()[..., None]) @ S_start + attn_intra @ v
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o.to(dtype), S
