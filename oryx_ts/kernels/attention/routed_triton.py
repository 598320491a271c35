"""Routed causal softmax attention in Triton: forward and backward for the routed queries only.

Same contract as `naive.routed_attention`. Queries are the gathered routed tokens; each attends to
every retained key with `k_pos <= q_pos` (and `k_valid`, for a bounded cache with holes). Work and
memory follow the routed queries: a query block scans only the key blocks that some of its rows can
see, the backward walks only the query blocks that can see a key block, and nothing of size
T x T or (all tokens) x S is ever formed.

Legend: B batch, Tq routed queries, S retained keys, H heads, K key dim, V value dim.

Requirements: `q_pos` ascending along the routed queries and `k_pos` ascending along the cache, as
the model produces them; each program finds its key (or query) range by a search on the device
(`_count2`: FAN-ary, two or three dependent vector loads where a binary search needs up to 16), so
a call never waits on the host.

Passes. Forward: one kernel. When too few query blocks fill the GPU, each block's keys are cut
into NSPLIT pieces, one program each; a piece writes its partial output and log-sum-exp, and the
last piece of a block to finish (a counter per block, reset by that program) merges them by their
log-sum-exp and writes the output, so no second launch. It also writes q times its temperature
and log2(e) (`qs`), the operand every backward kernel reads as it is. Backward, two launches, no
atomic sums: dq per (query block, key piece) (its programs also compute delta = rowsum(o * do)
for their rows; the last piece of a block sums the pieces' fp32 partials, applies the
temperature and writes dq and the block's share of the temperature's gradient); then dk, dv per
key block over the query blocks that see it (delta from the dq pass). Loops over keys (queries)
are split in two: blocks every row can see run without the causal mask. Query blocks run last
first within a head and piece (they see the most keys), so the grid's tail is the short work.
Fused backward (`FUSE_DQ`, per operand dtype and head width): one launch, the dk/dv kernel also
adds each pair's share of dq into an fp32 buffer with atomic adds (delta from torch beforehand);
it skips the dq pass's recomputation of the logits and dp, at the cost of atomic traffic and of
bitwise determinism in dq.

Files: this one (launch choices, forward kernel, autograd), `routed_triton_bwd` (backward kernels),
`routed_common` (device functions both use).

Counters: one int32 buffer per (device, stream), zero between calls (each block's last program
resets its entry): calls on one stream run one after the other, and calls on two streams of a
device each have their own buffer.

Numerics: logits, softmax statistics and accumulators in fp32; `exp2` with log2(e) folded into
`qs`, so dk takes a factor ln(2) at the end; the temperature's gradient is `sum(q * dq_scaled)`.
A query that sees no key returns zeros (the reference returns NaN there).

Launch configuration (`_launch`): tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass, operand
dtype and head width from `TILES`, and how finely key ranges split (`_SPLIT_WAVES`), chosen by sweeps
on an H200 (`benchmarks/routed_sweep.py`, docs/BENCHMARKS.md); no autotuning at run time.
"""

import json
import math
import os
from functools import cache

import torch
import triton
import triton.language as tl

from oryx_ts.kernels.attention.routed_common import _count2, _last_piece, _load_keys, _rows
from oryx_ts.kernels.attention.routed_triton_bwd import _bwd_dkdv_kernel, _bwd_dq_kernel

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MIN_SPLIT_KEYS = 1024  # below this many keys a split costs more than it balances
_FAN = 16 if _INTERPRET else 128  # fan-out of the on-device searches
# per pass: split key ranges until the grid holds this many programs per SM (2026-12-02 sweep: forward 16
# against 8, 3-8% faster at three of the four T=32k cases, 3% slower at D64 10% with the old forward tile;
# dq 16 against 8 within 2%, 2.7% faster only at D128 T32k 10%; 8 is what the sweep timed with the new dq tile)
_SPLIT_WAVES = {"fwd": 16, "dq": 8}
_REVERSE_M = True  # query blocks last first (the longest key ranges start first)
_COUNTERS: dict[tuple[torch.device, int | None], torch.Tensor] = {}
_FORCE: dict = {}  # sweeps only: pass -> tile, "waves_" + pass -> split waves, over every other choice

# (pass, operands "16bit" | "fp32", head width class 64 | 128) -> (BLOCK_M, BLOCK_N, num_warps, num_stages);
# passes "fwd", "dq", "dkdv" and "dkdv_fused" (the dk/dv kernel of the fused backward);
# fp32 tiles are smaller (4-byte operands, three tf32 products per dot)
TILES: dict[tuple[str, str, int], tuple[int, int, int, int]] = {
    # bf16, H200: B1 T32768 H8 10% routed (one pass varied at a time), then every shape of gpu.py's attention
    # section (B2 T8192 H8 D64, B2 T8192 H16 D128, B1 T32768 H8 D64/D128; 10% and 25%; routed_sweep.py,
    # benchmarks/results/routed_sweep_h200_2026-12-02.json): forward D64 64/128/4/3 (was 128/64/4/3) and dq
    # D128 128/64/8/3 (was 64/32/4/3) won at every device-bound shape of their width, by 8-18% of that pass;
    # no other tile won at any shape, so the tiles do not depend on the shape
    ("fwd", "16bit", 64): (64, 128, 4, 3),
    ("fwd", "16bit", 128): (64, 64, 4, 3),
    ("dq", "16bit", 64): (128, 64, 4, 3),
    ("dq", "16bit", 128): (128, 64, 8, 3),
    ("dkdv", "16bit", 64): (32, 64, 4, 3),
    ("dkdv", "16bit", 128): (64, 128, 8, 3),
    ("fwd", "fp32", 64): (64, 32, 4, 2),
    ("fwd", "fp32", 128): (64, 32, 4, 2),
    ("dq", "fp32", 64): (64, 32, 4, 2),
    ("dq", "fp32", 128): (64, 32, 4, 2),
    ("dkdv", "fp32", 64): (32, 64, 4, 2),
    ("dkdv", "fp32", 128): (32, 64, 4, 2),
    # the fused backward's dk/dv/dq kernel (FUSE_DQ below), 2026-12-03 sweep: at D128 the dkdv tile was the best of
    # four at every shape; at D64 others won (64/64/4/3, 32/128/4/3, 64/128/8/3), none by more than 1% over the
    # two-launch backward; fp32 D128 takes 32/32 (32/64 needs 257 KB of shared memory on sm90, over its 227 KB)
    ("dkdv_fused", "16bit", 64): (32, 64, 4, 3),
    ("dkdv_fused", "16bit", 128): (64, 128, 8, 3),
    ("dkdv_fused", "fp32", 64): (32, 64, 4, 2),
    ("dkdv_fused", "fp32", 128): (32, 32, 4, 2),
}
# (operands, head width class) whose backward is one launch: the dk/dv kernel also adds each (key block, query
# block) pair's share of dq into an fp32 buffer with atomic adds, so dq's sums are not bitwise deterministic
# (their order varies from run to run); the other classes run the two-launch backward, deterministic.
# None by default: on an H200 (2026-12-03, routed_sweep.py, bf16) the fused one is 2-4% faster at D128 at three
# of the four shapes (B2 T8192 H16 10%, B1 T32768 H8 10% and 25%) and 1.9% slower at B2 T8192 H16 25%; at D64
# at most 1% faster (T32768) and up to 53% slower (B2 T8192 H8 25%); a few percent do not pay for giving up
# deterministic gradients
FUSE_DQ: set[tuple[str, int]] = set()


def _tune_from_env() -> None:
    """Benchmark sweeps only: `ORYX_ROUTED_TUNE` (JSON) replaces tiles and the two knobs above, e.g.
    {"tiles": {"fwd,16bit,128": [64, 64, 4, 3]}, "split_waves": 8 (both passes) or {"fwd": 4}, "reverse_m": true,
    "fuse_dq": {"16bit,128": true}}."""
    global _REVERSE_M
    tune = json.loads(os.environ.get("ORYX_ROUTED_TUNE") or "{}")
    for key, tile in tune.get("tiles", {}).items():
        kernel, dtype, width = key.split(",")
        TILES[(kernel, dtype, int(width))] = tuple(tile)
    waves = tune.get("split_waves", {})
    _SPLIT_WAVES.update(waves if isinstance(waves, dict) else dict.fromkeys(_SPLIT_WAVES, int(waves)))
    _REVERSE_M = bool(tune.get("reverse_m", _REVERSE_M))
    for key, on in tune.get("fuse_dq", {}).items():
        dtype, width = key.split(",")
        (FUSE_DQ.add if on else FUSE_DQ.discard)((dtype, int(width)))


_tune_from_env()


def _launch(kernel: str, dtype: torch.dtype, width: int) -> tuple[tuple[int, int, int, int], int]:
    """(tile, split waves) of one pass ("fwd", "dq", "dkdv"): `TILES` and `_SPLIT_WAVES`, the same at every
    shape; the split factor follows the shape through `_n_split`. The sweep found no shape where another
    tile won on the device; at B2 T8192 H8 D64 the call is host-bound (device time about 40% of the
    forward's, 20-30% of fwd+bwd), so its launch configuration barely moves the call's time."""
    waves = _FORCE.get("waves_" + kernel) or _SPLIT_WAVES.get(kernel, 1)
    if kernel in _FORCE:
        return _FORCE[kernel], waves
    if _INTERPRET:
        return (16, 16, 4, 1), waves
    return TILES[(kernel, "fp32" if dtype == torch.float32 else "16bit", 64 if width <= 64 else 128)], waves


def _fuse_dq(dtype: torch.dtype, width: int) -> bool:
    """Whether the backward is the fused one-launch kind (`FUSE_DQ`; `_FORCE["fuse_dq"]` in sweeps)."""
    if "fuse_dq" in _FORCE:
        return bool(_FORCE["fuse_dq"])
    return ("fp32" if dtype == torch.float32 else "16bit", 64 if width <= 64 else 128) in FUSE_DQ


def _head_blocks(K: int, V: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_V): head dims padded to powers of two, at least 16. In fp32 both take the
    larger of the two: with key and value blocks of different widths the fp32 dK/dV kernel faults
    when every token is routed (an illegal memory access on an H100, triton 3.6; seen at 16/32,
    16/64 and 32/16, never with equal widths or in bf16). Not yet traced to its cause."""
    bk, bv = max(16, 1 << (K - 1).bit_length()), max(16, 1 << (V - 1).bit_length())  # next powers of two
    return (max(bk, bv),) * 2 if dtype == torch.float32 else (bk, bv)


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints; `triton.cdiv` costs about 2 us a call on the host (a constexpr function)."""
    return -(-a // b)


def _levels(n: int) -> int:
    """Vector loads `_count2` needs to search n sorted entries with fan-out _FAN."""
    return max(1, math.ceil(math.log(max(n, 2)) / math.log(_FAN) - 1e-9))


@triton.jit
def _softmax_step(q, k, v, kpos, ok, qpos, m_i, l_i, acc, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr,
                  PREC: tl.constexpr):
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)  # log2 domain: q carries log2(e)
    if CAUSAL:
        qk = tl.where(ok[None, :] & (kpos[None, :] <= qpos[:, None]), qk, float("-inf"))
    elif HAS_VALID:
        qk = tl.where(ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _store_out(O, LSE, o, lse, b, h, pid_bh, offs_m, offs_v, m_mask, s_ob, s_ot, s_oh, TQ, DV: tl.constexpr):
    """The final output rows and their log2-sum-exp (+inf for rows that see nothing, so the backward gives them p = 0)."""
    tl.store(O + b.to(tl.int64) * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_ot + offs_v[None, :],
             o.to(O.dtype.element_ty), mask=m_mask[:, None] & (offs_v[None, :] < DV))
    tl.store(LSE + pid_bh.to(tl.int64) * TQ + offs_m, tl.where(lse > float("-inf"), lse, float("inf")), mask=m_mask)


@triton.jit
def _fwd_kernel(Q, Kc, Vc, O, LSE, OP, LP, QS, SCALE, QPOS, KPOS, KVALID, CNT,
                s_qb, s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_ot, s_oh, s_valid_b,
                B, H, TQ, S, SPLIT, LEVELS_S,
                DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr, PREC: tl.constexpr,
                STORE_QS: tl.constexpr, REVERSE_M: tl.constexpr, FAN: tl.constexpr):
    n_mb = tl.num_programs(0)
    pid_m = tl.program_id(0)
    if REVERSE_M:
        pid_m = n_mb - 1 - pid_m
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    m_mask = offs_m < TQ
    # keys visible to some row (kend) and to every row (kfull) of this block; positions ascend
    q_first = tl.load(QPOS + pid_m * BLOCK_M)
    q_last = tl.load(QPOS + tl.minimum(pid_m * BLOCK_M + BLOCK_M, TQ) - 1)
    kend, kfull = _count2(KPOS, S, q_last, q_first, LEVELS_S, False, FAN)
    n_act = tl.maximum((kend + SPLIT - 1) // SPLIT, 1)  # pieces with keys (one, empty, if none)
    if pid_s < n_act:
        lo = pid_s * SPLIT
        hi = tl.minimum(lo + SPLIT, kend)
        n_full = tl.minimum((kfull // BLOCK_N) * BLOCK_N, hi)
        scale = tl.load(SCALE + h).to(tl.float32) * 1.4426950408889634
        q = (_rows(Q, b, h, offs_m, offs_k, m_mask, s_qb, s_qt, s_qh, DK).to(tl.float32) * scale).to(Q.dtype.element_ty)
        if STORE_QS:
            if pid_s == 0:  # the backward's operand, contiguous [B, Tq, H, K]
                tl.store(QS + ((b * TQ).to(tl.int64) + offs_m[:, None]) * (H * DK) + h * DK + offs_k[None, :], q,
                         mask=m_mask[:, None] & (offs_k[None, :] < DK))
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        if lo < hi:
            qpos = tl.load(QPOS + offs_m, mask=m_mask, other=-1)
            Kp = Kc + b.to(tl.int64) * s_kb + h * s_kh
            Vp = Vc + b.to(tl.int64) * s_vb + h * s_vh
            # keys every row of this block can see: no causal mask
            for start_n in range(lo, n_full, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                k, v, kpos, ok = _load_keys(Kp, Vp, KPOS, KVALID, offs_n, offs_k, offs_v, S, s_ks, s_vs, s_valid_b, b,
                                            DK, DV, HAS_VALID)
                m_i, l_i, acc = _softmax_step(q, k, v, kpos, ok, qpos, m_i, l_i, acc, False, HAS_VALID, PREC)
            # keys near the diagonal: causal mask per row
            for start_n in range(tl.maximum(lo, n_full), hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                k, v, kpos, ok = _load_keys(Kp, Vp, KPOS, KVALID, offs_n, offs_k, offs_v, S, s_ks, s_vs, s_valid_b, b,
                                            DK, DV, HAS_VALID)
                m_i, l_i, acc = _softmax_step(q, k, v, kpos, ok, qpos, m_i, l_i, acc, True, HAS_VALID, PREC)

        has_keys = l_i > 0.0
        o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        # log2-domain log-sum-exp of this key range, -inf where a row saw none of it
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        if n_act == 1:
            _store_out(O, LSE, o, lse, b, h, pid_bh, offs_m, offs_v, m_mask, s_ob, s_ot, s_oh, TQ, DV)
        else:
            row = (pid_s * B * H + pid_bh).to(tl.int64) * TQ + offs_m
            tl.store(OP + row[:, None] * BLOCK_V + offs_v[None, :], o, mask=m_mask[:, None])
            tl.store(LP + row, lse, mask=m_mask)
            if _last_piece(CNT, pid_bh * n_mb + pid_m, n_act):
                # merge the pieces by their log-sum-exp (this program's own from its registers)
                m_all = lse
                for s in range(0, n_act):
                    r = (s * B * H + pid_bh).to(tl.int64) * TQ + offs_m
                    lp = tl.load(LP + r, mask=m_mask, other=float("-inf"), cache_modifier=".cg")
                    m_all = tl.maximum(m_all, tl.where(s == pid_s, lse, lp))
                seen = m_all > float("-inf")
                m_safe = tl.where(seen, m_all, 0.0)
                l_all = tl.zeros([BLOCK_M], dtype=tl.float32)
                acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
                for s in range(0, n_act):
                    r = (s * B * H + pid_bh).to(tl.int64) * TQ + offs_m
                    lp = tl.load(LP + r, mask=m_mask, other=float("-inf"), cache_modifier=".cg")
                    op = tl.load(OP + r[:, None] * BLOCK_V + offs_v[None, :], mask=m_mask[:, None], other=0.0,
                                 cache_modifier=".cg")
                    w = tl.math.exp2(tl.where(s == pid_s, lse, lp) - m_safe)
                    acc += w[:, None] * tl.where(s == pid_s, o, op)
                    l_all += w
                o = acc / tl.where(seen, l_all, 1.0)[:, None]
                lse = tl.where(seen, m_safe + tl.math.log2(tl.where(seen, l_all, 1.0)), float("-inf"))
                _store_out(O, LSE, o, lse, b, h, pid_bh, offs_m, offs_v, m_mask, s_ob, s_ot, s_oh, TQ, DV)



def _prec(dtype: torch.dtype) -> str:
    # fp32 operands: three tf32 products (near-fp32 accuracy on the tensor cores); "ieee" would
    # lower to scalar FMAs that take minutes to compile at these tile sizes
    return "tf32x3" if dtype == torch.float32 else "tf32"


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _n_split(n_programs: int, S: int, block_n: int, device: torch.device, waves: int) -> tuple[int, int]:
    """How many pieces to cut each key range into so the grid holds `waves` programs per SM; returns (NSPLIT, keys per piece)."""
    sms = 4 if _INTERPRET else _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    n = max(1, min(_cdiv(S, _MIN_SPLIT_KEYS), _cdiv(waves * sms, n_programs)))
    if _INTERPRET:
        n = max(1, min(_cdiv(S, 32), 3))  # exercise the split path on small inputs
    piece = _cdiv(_cdiv(S, n), block_n) * block_n
    return _cdiv(S, piece), piece


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """The per-block piece counters of the current stream on `device` (int32, zero between calls), at
    least n of them. Kernels on one stream run in order, so they can share the buffer; a call on
    another stream must not see a count in progress, so each stream has its own."""
    key = (device, torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else None)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.zeros(max(n, 1 << 16), device=device, dtype=torch.int32)
    return buf


class _RoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, q_pos, k_pos, k_valid, need_grad):
        B, Tq, H, K = q.shape
        S, V = k.shape[1], v.shape[-1]
        (BM, BN, warps, stages), waves = _launch("fwd", q.dtype, max(K, V))
        BLOCK_K, BLOCK_V = _head_blocks(K, V, q.dtype)
        o = torch.empty(B, Tq, H, V, device=q.device, dtype=v.dtype)
        lse = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
        qs = torch.empty(B, Tq, H, K, device=q.device, dtype=q.dtype) if need_grad else lse
        n_mblocks = _cdiv(Tq, BM)
        has_valid = k_valid is not None
        valid = k_valid.to(torch.int8).contiguous() if has_valid else q_pos
        nsplit, piece = _n_split(n_mblocks * B * H, S, BN, q.device, waves)
        if nsplit > 1:
            op = torch.empty(nsplit, B, H, Tq, BLOCK_V, device=q.device, dtype=torch.float32)
            lp = torch.empty(nsplit, B, H, Tq, device=q.device, dtype=torch.float32)
        else:
            op, lp = lse, lse
        _fwd_kernel[(n_mblocks, nsplit, B * H)](
            q, k, v, o, lse, op, lp, qs, scale, q_pos, k_pos, valid, _counters(q.device, n_mblocks * B * H),
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], valid.stride(0) if has_valid else 0,
            B, H, Tq, S, piece, _levels(S),
            DK=K, DV=V, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, BLOCK_M=BM, BLOCK_N=BN, HAS_VALID=has_valid,
            PREC=_prec(q.dtype), STORE_QS=need_grad, REVERSE_M=_REVERSE_M, FAN=_FAN, num_warps=warps, num_stages=stages,
        )
        if need_grad:
            ctx.save_for_backward(q, qs, k, v, scale, o, lse, q_pos, k_pos, valid)
            ctx.has_valid = has_valid
        return o

    @staticmethod
    def backward(ctx, do):
        q, qs, k, v, scale, o, lse, q_pos, k_pos, valid = ctx.saved_tensors
        B, Tq, H, K = q.shape
        S, V = k.shape[1], v.shape[-1]
        do = do if do.stride(-1) == 1 else do.contiguous()
        BLOCK_K, BLOCK_V = _head_blocks(K, V, q.dtype)
        common = dict(DK=K, DV=V, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, HAS_VALID=ctx.has_valid, PREC=_prec(q.dtype), FAN=_FAN)
        s_kv = (*k.stride()[:3], *v.stride()[:3])
        s_valid = valid.stride(0) if ctx.has_valid else 0
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)  # contiguous: written with their own strides
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        need_dscale = ctx.needs_input_grad[3]
        fused = _fuse_dq(q.dtype, max(K, V))
        if fused:  # dk, dv and atomic fp32 sums of dq in one launch; delta from torch
            delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()
            dq_acc = torch.zeros(B, Tq, H, K, device=q.device, dtype=torch.float32)
        else:  # dq (and delta, the pieces summed by each block's last one), then dk, dv
            (BM, BN, warps, stages), waves = _launch("dq", q.dtype, max(K, V))
            n_mblocks = _cdiv(Tq, BM)
            nsplit, piece = _n_split(n_mblocks * B * H, S, BN, q.device, waves)
            dq = torch.empty(B, Tq, H, K, device=q.device, dtype=q.dtype)
            dq_parts = torch.empty(nsplit, B, Tq, H, K, device=q.device, dtype=torch.float32) if nsplit > 1 else lse
            dsp = torch.empty(n_mblocks, B, H, device=q.device, dtype=torch.float32) if need_dscale else lse
            delta = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
            _bwd_dq_kernel[(n_mblocks, nsplit, B * H)](
                qs, q, k, v, o, do, dq, dq_parts, dsp, scale, lse, delta, q_pos, k_pos, valid,
                _counters(q.device, n_mblocks * B * H), *q.stride()[:3], *s_kv, *o.stride()[:3], *do.stride()[:3],
                s_valid, B, H, Tq, S, piece, _levels(S), BLOCK_M=BM, BLOCK_N=BN, NEED_DSCALE=need_dscale,
                REVERSE_M=_REVERSE_M, num_warps=warps, num_stages=stages, **common,
            )
            dq_acc = lse
        (BMk, BNk, warps_k, stages_k), _ = _launch("dkdv_fused" if fused else "dkdv", q.dtype, max(K, V))
        _bwd_dkdv_kernel[(_cdiv(S, BNk), B * H)](
            qs, k, v, do, dk, dv, dq_acc, lse, delta, q_pos, k_pos, valid, *s_kv, *do.stride()[:3], s_valid,
            *dk.stride()[:3], *dv.stride()[:3], H, Tq, S, _levels(Tq),
            BLOCK_M=BMk, BLOCK_N=BNk, num_warps=warps_k, num_stages=stages_k, FUSE_DQ=fused, **common,
        )
        if fused:
            dq = (dq_acc * scale.float().view(1, 1, H, 1)).to(q.dtype)
            dscale = (q.float() * dq_acc).sum((0, 1, 3)).to(scale.dtype) if need_dscale else None
            return dq, dk, dv, dscale, None, None, None, None
        dscale = dsp.sum((0, 1)).to(scale.dtype) if need_dscale else None
        return dq, dk, dv, dscale, None, None, None, None


def routed_attention_triton(
    q_BTqHK: torch.Tensor,
    k_BSHK: torch.Tensor,
    v_BSHV: torch.Tensor,
    *,
    q_pos_Tq: torch.Tensor,
    k_pos_S: torch.Tensor,
    scale_H: torch.Tensor,
    k_valid_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed attention on the GPU; differentiable in q, k, v and `scale_H`. Returns o_BTqHV in v's dtype.

    `q_pos_Tq` and `k_pos_S` must be ascending (see the module docstring).
    """
    dtype = q_BTqHK.dtype
    B, Tq, H, K = q_BTqHK.shape
    if Tq == 0:
        return v_BSHV.new_zeros(B, 0, H, v_BSHV.shape[-1])
    # the checks skip no-op conversions, which cost host time at small shapes (launch-bound)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous()
               for t in (q_BTqHK, *(t if t.dtype == dtype else t.to(dtype) for t in (k_BSHK, v_BSHV))))
    q_pos, k_pos = (p if p.dtype == torch.int64 and p.is_contiguous() else p.to(torch.int64).contiguous()
                    for p in (q_pos_Tq, k_pos_S))
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, scale_H))
    o = _RoutedAttention.apply(q, k, v, scale_H, q_pos, k_pos, k_valid_BS, need_grad)
    return o if o.dtype == v_BSHV.dtype else o.to(v_BSHV.dtype)
