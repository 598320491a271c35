"""Gated DeltaNet in pure PyTorch: the ground truth and the CPU path.

Ops on already-projected tensors, in fla's layout. Everything is computed in fp32 and cast back.

Legend: B batch, T tokens, H heads, K key dim, V value dim.
    q_BTHK, k_BTHK   queries and keys (keys are expected L2-normalized)
    v_BTHV           values
    g_BTH            log decay per token (<= 0)
    beta_BTH         delta-rule write strength in (0, 1)
    state_BHKV       recurrent state S, read as o = q @ S

Recurrence, token by token:
    S <- exp(g) * S
    S <- S + beta * k (v - k^T S)^T
    o  = scale * q^T S
"""

import torch
import torch.nn.functional as F


def naive_recurrent_gdn(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token Gated DeltaNet. Returns `(o_BTHV, final_state_BHKV)`; the state is fp32."""
    dtype = v_BTHV.dtype
    B, T, H, K = k_BTHK.shape
    V = v_BTHV.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = (t.float() for t in (q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float().clone()
    o = q.new_zeros(B, T, H, V)
    for t in range(T):
        o[:, t], S = gdn_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S, scale=scale)
    return o.to(dtype), S


def gdn_step(
    q_BHK: torch.Tensor,
    k_BHK: torch.Tensor,
    v_BHV: torch.Tensor,
    g_BH: torch.Tensor,
    beta_BH: torch.Tensor,
    state_BHKV: torch.Tensor,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence. Returns `(o_BHV, new_state_BHKV)`; does not modify its inputs."""
    scale = q_BHK.shape[-1] ** -0.5 if scale is None else scale
    S = state_BHKV.float() * g_BH.float().exp()[..., None, None]
    k = k_BHK.float()
    delta_BHV = beta_BH.float()[..., None] * (v_BHV.float() - torch.einsum("bhk,bhkv->bhv", k, S))
    S = S + k[..., :, None] * delta_BHV[..., None, :]
    o_BHV = torch.einsum("bhk,bhkv->bhv", q_BHK.float() * scale, S)
    return o_BHV.to(v_BHV.dtype), S


GROUP = 64  # chunks scanned together (the scan's work grows as chunks x log2(chunks))


def naive_chunk_gdn(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked Gated DeltaNet (WY representation), same contract as `naive_recurrent_gdn`.

    Inside a chunk of C tokens the delta-rule updates are folded into a lower-triangular solve,
    so the work is a few (C x C) and (C x K) matmuls per chunk instead of C sequential updates.
    """
    dtype = v_BTHV.dtype
    B, T, H, K = k_BTHK.shape
    V = v_BTHV.shape[-1]
    C = min(chunk_size, T)
    scale = K**-0.5 if scale is None else scale
    pad = (-T) % C
    # (B, H, T, .) layout, fp32, padded to whole chunks; padded tokens have g = 0 and beta = 0,
    # so they leave the state unchanged and their outputs are dropped.
    q, k, v = (F.pad(t.float().transpose(1, 2), (0, 0, 0, pad)) for t in (q_BTHK, k_BTHK, v_BTHV))
    g, beta = (F.pad(t.float().transpose(1, 2), (0, pad)) for t in (g_BTH, beta_BTH))
    N = (T + pad) // C
    q = q.reshape(B, H, N, C, K) * scale
    k = k.reshape(B, H, N, C, K)
    v = v.reshape(B, H, N, C, V)
    beta = beta.reshape(B, H, N, C)
    gcum = g.reshape(B, H, N, C).cumsum(-1)

    tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay from token j to token i inside a chunk (i >= j); 0 above the diagonal
    decay_CC = (gcum[..., :, None] - gcum[..., None, :]).masked_fill(~tril, float("-inf")).exp()
    k_beta = k * beta[..., None]
    # A = I + strictly-lower(beta_i k_i.k_j decay_ij); the solve reads only A's strict lower
    # triangle (unit diagonal), so the product needs no mask. One solve gives the pseudo-values
    # u = A^{-1} (beta v) and w = A^{-1} (beta k exp(gcum)), how the incoming state perturbs them.
    A = k_beta @ k.transpose(-1, -2) * decay_CC
    rhs = torch.cat([v * beta[..., None], k_beta * gcum.exp()[..., None]], dim=-1)
    u, w = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)

    # Across chunks the state follows an affine recurrence S <- M_n S + c_n with
    # M_n = exp(g_last) I - k_decayed^T w and c_n = k_decayed^T u: its prefix compositions come
    # from a scan of log2(chunks) batched matmuls instead of a loop over chunks, GROUP at a time
    g_last = gcum[..., -1]
    k_decayed = k * (g_last[..., None] - gcum).exp()[..., None]
    kd_T = k_decayed.transpose(-1, -2)
    eye_K = torch.eye(K, device=q.device)
    M = g_last.exp()[..., None, None] * eye_K - kd_T @ w  # (B, H, N, K, K)
    c = kd_T @ u  # (B, H, N, K, V)
    S = None if initial_state is None else initial_state.float()
    starts = []
    for n0 in range(0, N, GROUP):
        M_pre, c_pre = _affine_prefix(M[:, :, n0 : n0 + GROUP], c[:, :, n0 : n0 + GROUP], need_maps=S is not None)
        S_after = c_pre if S is None else M_pre @ S[:, :, None] + c_pre
        starts += [q.new_zeros(B, H, 1, K, V) if S is None else S[:, :, None], S_after[:, :, :-1]]
        S = S_after[:, :, -1]
    S_start = torch.cat(starts, dim=2)  # the state before each chunk

    attn_intra = q @ k.transpose(-1, -2) * decay_CC
    v_new = u - w @ S_start
    o = (q * gcum.exp()[..., None]) @ S_start + attn_intra @ v_new
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2)
    return o.to(dtype), S


def _affine_prefix(M_BHNKK: torch.Tensor, c_BHNKV: torch.Tensor, *, need_maps: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Inclusive prefix compositions of the maps S -> M_n S + c_n (Hillis-Steele scan over n).

    Returns `(M_pre, c_pre)` with `S_after_n = M_pre[n] @ S_0 + c_pre[n]`; `M_pre` is None when not
    `need_maps` (a zero initial state), which saves the last round's matrix product.
    """
    M, c = M_BHNKK, c_BHNKV
    n, d = M.shape[2], 1
    while d < n:
        c = torch.cat([c[:, :, :d], M[:, :, d:] @ c[:, :, :-d] + c[:, :, d:]], dim=2)
        if need_maps or 2 * d < n:
            M = torch.cat([M[:, :, :d], M[:, :, d:] @ M[:, :, :-d]], dim=2)
        d *= 2
    return (M if need_maps else None), c
