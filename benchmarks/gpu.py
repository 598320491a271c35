"""GPU benchmark of oryx_ts's fast paths against their peers, measured in one run on one device.

Builds (JIT-compiles) every kernel, checks our outputs against a peer on the same inputs, times
with `triton.testing.do_bench` (median, ms), prints one table and writes `gpu_bench.json` and
`gpu_bench.md` to `--out` (default `$OUT`, else `runs/bench`). Sections:

    attention  routed attention (ours) vs FlexAttention (gathered queries + block mask) and
               full causal SDPA (cuDNN and flash backends), forward and forward+backward
    mixers     the linear mixers alone: fla GDN, mamba-ssm SSD, fla simple GLA
    layer      one Oryx layer (d_model 512, 8 heads of 64) forward+backward at attention
               fractions 0 / 0.1 / 0.25 / 1 vs a pure fla GDN layer and a pure SDPA layer; at 10% and
               25% also the routed inputs (`dispatch.routed_inputs`) the other way: eager ops where the
               default takes their compiled graph (up to 16,384 tokens), the compiled graph above
    step       `model.step` of a 4-layer model, 16,384 series, bounded cache 512, 0% and 10% attention:
               eager and CUDA-graphed, fp32 and bf16 recurrent state, the fused kernels alone and the
               general path, against the state-bytes floor; 1,024 series eager vs graphed
               (ORYX_PROFILE_STEP=1 adds a torch.profiler table of three steps)
    profile    (not in the default run) torch.profiler tables of the Oryx layer at T=32k, 0% and
               10% attention: where its time goes (ORYX_PROFILE_TRACE=1 also writes the timelines)

Usage: python benchmarks/gpu.py [--sections attention,mixers,layer,step] [--budget-s 420]
`benchmarks/gpu_all.sh` installs the carried wheels and runs the parity tests and this script.
Every run first measures its ceilings (a 2 GiB device copy, a bf16 8192^3 matmul, random data);
each floor divides the bytes or FLOPs a case must move or do by them, and rows print their share.
Routing in every section: chunks of 128 tokens, each routed to attention at random with the given
rate (seeded), so the routed fraction is what the table says up to sampling.
"""

import argparse
import json
import math
import os
import sys
import time
import traceback
from datetime import date
from functools import partial
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oryx_ts.block import OryxBlock, RMSNorm, ShortConv, SwiGLU, _l2norm  # noqa: E402
from oryx_ts.config import BlockConfig  # noqa: E402
from oryx_ts.kernels import dispatch as _dispatch  # noqa: E402

DT = torch.bfloat16
ROUTE_CHUNK = 128
rows: list[dict] = []
notes: list[str] = []
T0 = time.time()


def bench(fn, warmup=25, rep=100) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def add(section, case, impl, ms, baseline=None, ratio_to=None, **extra):
    row = dict(section=section, case=case, impl=impl, ms=round(ms, 4), **extra)
    if baseline is not None:
        row["ratio"] = round(ms / baseline, 3)
        row["ratio_to"] = ratio_to
    rows.append(row)
    r = f"  {row['ratio']:.3f}x {ratio_to}" if baseline is not None else ""
    if "share_of_floor" in extra:
        r += f"  ({extra['share_of_floor']:.0%} of its floor)"
    print(f"[{section}] {case:<38} {impl:<34} {ms:9.3f} ms{r}", flush=True)
    return ms


def routed_positions(T: int, frac: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = T // ROUTE_CHUNK
    chosen = torch.rand(n, generator=gen) < frac
    if frac > 0 and not chosen.any():
        chosen[n // 2] = True
    return chosen.repeat_interleave(ROUTE_CHUNK).nonzero().squeeze(1).cuda()


# ----------------------------------------------------------------------------- attention
def section_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from oryx_ts.kernels.attention.routed_triton import routed_attention_triton

    flex = torch.compile(flex_attention, dynamic=False)
    shapes = [(1, 32768, 8, 64), (2, 8192, 8, 64), (2, 8192, 16, 128), (1, 32768, 8, 128)]
    for B, T, H, D in shapes:
        torch.manual_seed(0)
        q_full = F.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).to(DT)
        k = F.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).to(DT).requires_grad_()
        v = torch.randn(B, T, H, D, device="cuda", dtype=DT).requires_grad_()
        scale = torch.full((H,), 1.0 / math.sqrt(D), device="cuda")
        k_pos = torch.arange(T, device="cuda")
        # full causal SDPA, fastest backend of cuDNN and flash
        qh, kh, vh = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q_full, k, v))
        do_full = torch.randn_like(qh)
        sdpa = {}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    f = lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)  # noqa: E731
                    fb = lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).backward(do_full)  # noqa: E731
                    f()
                    sdpa[name] = (bench(f), bench(fb))
            except Exception as e:  # a backend may not take this shape
                notes.append(f"SDPA {name} B{B} T{T} H{H} D{D}: {type(e).__name__}: {str(e)[:120]}")
        case = f"B{B} T{T} H{H} D{D}"
        # FLOP floors: QK^T and PV, 4 FLOP per (query, visible key, head, dim); forward+backward 3.5x the
        # forward (flash-attention 2: 2 forward matmuls, 5 backward ones with the recompute)
        full_f = flop_floor_ms(4 * B * H * D * T * (T + 1) / 2)
        for name, (f_ms, fb_ms) in sdpa.items():
            add("attention", case, f"SDPA causal {name} fwd", f_ms, share_of_floor=round(full_f / f_ms, 3))
            add("attention", case, f"SDPA causal {name} fwd+bwd", fb_ms, share_of_floor=round(3.5 * full_f / fb_ms, 3))
        best_f = min(v_[0] for v_ in sdpa.values())
        best_fb = min(v_[1] for v_ in sdpa.values())
        for frac in (0.1, 0.25):
            q_pos = routed_positions(T, frac, seed=T + D)
            Tq = q_pos.numel()
            q = q_full[:, q_pos].detach().requires_grad_()
            do = torch.randn(B, Tq, H, D, device="cuda", dtype=DT)
            ours = lambda: routed_attention_triton(q, k, v, q_pos_Tq=q_pos, k_pos_S=k_pos, scale_H=scale)  # noqa: E731
            ours_b = lambda: ours().backward(do)  # noqa: E731
            # FlexAttention on the gathered queries: mask_mod reads each query's position
            qf = q.detach().transpose(1, 2).contiguous().requires_grad_()
            kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (k, v))

            def mask_mod(b, h, q_idx, kv_idx):
                return kv_idx <= q_pos[q_idx]

            t_mask = time.time()
            block_mask = create_block_mask(mask_mod, None, None, Tq, T, device="cuda")
            torch.cuda.synchronize()
            mask_ms = (time.time() - t_mask) * 1e3
            fl = lambda: flex(qf, kf, vf, block_mask=block_mask, scale=1.0 / math.sqrt(D))  # noqa: E731
            fl_b = lambda: fl().backward(do.transpose(1, 2))  # noqa: E731
            err = rel_err(ours().transpose(1, 2).float(), fl().float())
            f_fl, fb_fl = bench(fl), bench(fl_b)
            f_o, fb_o = bench(ours), bench(ours_b)
            c = f"{case} routed {frac:.0%} (Tq={Tq})"
            fl_f = flop_floor_ms(4 * B * H * D * float((q_pos + 1).sum()))
            add("attention", c, "FlexAttention fwd", f_fl, best_f, "SDPA best fwd", mask_build_ms=round(mask_ms, 2))
            add("attention", c, "FlexAttention fwd+bwd", fb_fl, best_fb, "SDPA best fwd+bwd")
            add("attention", c, "ours fwd", f_o, best_f, "SDPA best fwd", vs_flex=round(f_o / f_fl, 3),
                rel_err_vs_flex=err, share_of_floor=round(fl_f / f_o, 3))
            add("attention", c, "ours fwd+bwd", fb_o, best_fb, "SDPA best fwd+bwd", vs_flex=round(fb_o / fb_fl, 3),
                share_of_floor=round(3.5 * fl_f / fb_o, 3))
            del q, qf, block_mask
        del q_full, k, v, qh, kh, vh
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- mixers
def section_mixers():
    from oryx_ts.kernels.gdn.fast import fla_chunk_gdn
    from oryx_ts.kernels.mamba2.fast import fla_chunk_ssd, mamba_ssm_chunk_ssd

    B, T, H, D = 2, 8192, 8, 64
    torch.manual_seed(0)
    mk = lambda: F.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).to(DT).requires_grad_()  # noqa: E731
    q, k = mk(), mk()
    v = torch.randn(B, T, H, D, device="cuda", dtype=DT).requires_grad_()
    g = (-torch.rand(B, T, H, device="cuda") * 0.1).requires_grad_()
    beta = torch.rand(B, T, H, device="cuda").requires_grad_()
    do = torch.randn(B, T, H, D, device="cuda", dtype=DT)
    case = f"B{B} T{T} H{H} D{D}"
    for name, fn, backward in (
        ("fla chunk_gated_delta_rule", lambda: fla_chunk_gdn(q, k, v, g, beta)[0], True),
        ("mamba-ssm chunk_scan_combined", lambda: mamba_ssm_chunk_ssd(q, k, v, g)[0], True),
        # fla refuses this backward on Hopper with triton < 3.7.1 for 16-bit inputs (issue 640)
        ("fla chunk_simple_gla", lambda: fla_chunk_ssd(q, k, v, g)[0], False),
    ):
        try:
            add("mixers", case, f"{name} fwd", bench(fn))
            with torch.no_grad():
                add("mixers", case, f"{name} fwd (no grad)", bench(fn))
            if backward:
                add("mixers", case, f"{name} fwd+bwd", bench(lambda: fn().backward(do)))
        except Exception as e:
            notes.append(f"mixers {name}: {type(e).__name__}: {str(e)[:160]}")
            print("  skipped:", notes[-1], flush=True)


# ----------------------------------------------------------------------------- layer
class PureGDNLayer(nn.Module):
    """A Gated DeltaNet layer of the same width: the Oryx layer without the attention query."""

    def __init__(self, c: BlockConfig):
        super().__init__()
        D, H, K, V = c.d_model, c.n_heads, c.head_dim_k, c.head_dim_v
        self.c = c
        self.norm, self.mlp_norm = RMSNorm(D), RMSNorm(D)
        self.qkv = nn.Linear(D, H * (2 * K + 2 * V) + 2 * H, bias=False)
        self.conv = ShortConv(H * (2 * K + V), c.conv_size)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.o_norm = RMSNorm(V)
        self.o_proj = nn.Linear(H * V, D, bias=False)
        self.mlp = SwiGLU(D, c.mlp_hidden)

    def forward(self, x):
        from oryx_ts.kernels.gdn.fast import fla_chunk_gdn

        c = self.c
        B, T, _ = x.shape
        H, K, V = c.n_heads, c.head_dim_k, c.head_dim_v
        u = self.norm(x)
        qkv, z, a, b = self.qkv(u).split([H * (2 * K + V), H * V, H, H], -1)
        qkv, _ = self.conv(qkv, None)
        q, k, v = F.silu(qkv).split([H * K, H * K, H * V], -1)
        q, k, v = _l2norm(q.view(B, T, H, K)), _l2norm(k.view(B, T, H, K)), v.view(B, T, H, V)
        g = -torch.exp(self.A_log.float()) * F.softplus(a.float() + self.dt_bias)
        o, _ = fla_chunk_gdn(q, k, v, g, torch.sigmoid(b.float()))
        o = self.o_norm(o) * F.silu(z.view(B, T, H, V))
        x = x + self.o_proj(o.reshape(B, T, H * V))
        return x + self.mlp(self.mlp_norm(x))


class PureAttentionLayer(nn.Module):
    """A causal softmax attention layer of the same width (SDPA, flash backend), RoPE on q and k."""

    def __init__(self, c: BlockConfig):
        super().__init__()
        D, H, K, V = c.d_model, c.n_heads, c.head_dim_k, c.head_dim_v
        self.c = c
        self.norm, self.mlp_norm = RMSNorm(D), RMSNorm(D)
        self.qkvz = nn.Linear(D, H * (2 * K + 2 * V), bias=False)
        self.o_norm = RMSNorm(V)
        self.o_proj = nn.Linear(H * V, D, bias=False)
        self.mlp = SwiGLU(D, c.mlp_hidden)

    def forward(self, x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        c = self.c
        B, T, _ = x.shape
        H, K, V = c.n_heads, c.head_dim_k, c.head_dim_v
        q, k, v, z = self.qkvz(self.norm(x)).split([H * K, H * K, H * V, H * V], -1)
        pos = torch.arange(T, device=x.device)
        q, k = _dispatch.rope(q.view(B, T, H, K), pos), _dispatch.rope(k.view(B, T, H, K), pos)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, H, V).transpose(1, 2),
                                               is_causal=True).transpose(1, 2)
        o = self.o_norm(o) * F.silu(z.view(B, T, H, V))
        x = x + self.o_proj(o.reshape(B, T, H * V))
        return x + self.mlp(self.mlp_norm(x))


def section_layer():
    c = BlockConfig(d_model=512, n_layers=1, n_heads=8, head_dim_k=64, head_dim_v=64, mixer="gdn", chunk_size=64)
    torch.manual_seed(0)
    oryx = OryxBlock(c).cuda().to(DT)
    gdn = PureGDNLayer(c).cuda().to(DT)
    att = PureAttentionLayer(c).cuda().to(DT)
    # the routed queries' gather, norm and RoPE: one compiled graph by default on CUDA up to 16,384 tokens (eager ops
    # above, or everywhere with ORYX_COMPILE_ROUTED_INPUTS=0); its first call compiles, and if that fails only eager rows
    compiled = os.environ.get("ORYX_COMPILE_ROUTED_INPUTS") != "0"
    eager = mock.patch.object(_dispatch, "routed_inputs", partial(_dispatch.routed_inputs, backend="torch"))
    try:
        if compiled:
            kk = torch.randn(1, 64, 8, 64, device="cuda", dtype=DT, requires_grad=True)
            rows = torch.randn(1, 64, 512, device="cuda", dtype=DT, requires_grad=True)
            idx, pos = torch.arange(0, 64, 2, device="cuda"), torch.arange(64, device="cuda")
            ys = _dispatch.routed_inputs(kk, rows, idx, pos, rope_base=1e4, backend="triton")
            (ys[0].float().sum() + ys[1].float().sum()).backward()
    except Exception as e:
        notes.append(f"layer: compiled routed inputs failed, eager ops in every row: {type(e).__name__}: {str(e)[:200]}")
        compiled = False
        with eager:
            _layer_rows(c, oryx, gdn, att, compiled)
        return
    _layer_rows(c, oryx, gdn, att, compiled)


# the layer's lengths (ORYX_LAYER_T, comma-separated, to time fewer) and do_bench's time per case (about 18 runs at T=32k)
LAYER_T = tuple(int(t) for t in os.environ.get("ORYX_LAYER_T", "2048,8192,32768").split(","))
LAYER_REP_MS = 300


def _layer_rows(c, oryx, gdn, att, compiled):
    eager = mock.patch.object(_dispatch, "routed_inputs", partial(_dispatch.routed_inputs, backend="torch"))
    forced = mock.patch.object(_dispatch, "routed_inputs", partial(_dispatch.routed_inputs, backend="triton"))
    for T in LAYER_T:
        B = 1
        x = torch.randn(B, T, c.d_model, device="cuda", dtype=DT, requires_grad=True)
        dy = torch.randn_like(x)
        case = f"B{B} T{T} d512 H8x64"
        base_gdn = add("layer", case, "pure fla GDN layer fwd+bwd", bench(lambda: gdn(x).backward(dy), rep=LAYER_REP_MS))
        base_att = add("layer", case, "pure SDPA flash layer fwd+bwd", bench(lambda: att(x).backward(dy), rep=LAYER_REP_MS))
        for frac in (0.0, 0.1, 0.25, 1.0):
            m = torch.zeros(B, T, device="cuda", dtype=DT)
            if frac > 0:
                m[:, routed_positions(T, frac, seed=T)] = 1
            oryx(x, m).backward(dy)
            assert _dispatch.last_backend["linear_chunk"] == "triton"
            if frac > 0:
                assert _dispatch.last_backend["routed_attention"] == "triton"
                # the default takes the compiled graph up to ROUTED_INPUTS_COMPILE_MAX_TOKENS tokens, the eager ops above
                by_default = compiled and B * T <= _dispatch.ROUTED_INPUTS_COMPILE_MAX_TOKENS
                assert _dispatch.last_backend["routed_inputs"] == ("triton" if by_default else "torch")
            ms = bench(lambda: oryx(x, m).backward(dy), rep=LAYER_REP_MS)
            add("layer", f"{case} attention {frac:.0%}", "Oryx layer fwd+bwd", ms, base_gdn, "pure GDN layer",
                vs_attention_layer=round(ms / base_att, 3))
            if frac in (0.1, 0.25) and compiled:  # the other way to the routed queries and the keys' RoPE
                with (eager if by_default else forced):
                    oryx(x, m).backward(dy)
                    ms_t = bench(lambda: oryx(x, m).backward(dy), rep=LAYER_REP_MS)
                add("layer", f"{case} attention {frac:.0%}",
                    f"Oryx layer fwd+bwd, {'eager' if by_default else 'compiled'} routed inputs", ms_t, base_gdn,
                    "pure GDN layer", vs_default=round(ms_t / ms, 3))
            if frac == 0.1:
                # modes that are not exactly 0/1 take the general mix m * o_att + (1 - m) * o_lin
                m_soft = m * (1 - 2**-8)
                ms_s = bench(lambda: oryx(x, m_soft).backward(dy), rep=LAYER_REP_MS)
                add("layer", f"{case} attention {frac:.0%}", "Oryx layer fwd+bwd, general mode mix", ms_s, ms,
                    "same, hard-mode shortcut")
        del x, dy
        torch.cuda.empty_cache()


def section_profile():
    """Where the Oryx layer's time goes at T=32k: torch.profiler tables (device time per op) at 0% and 10%."""
    from torch.profiler import ProfilerActivity, profile

    c = BlockConfig(d_model=512, n_layers=1, n_heads=8, head_dim_k=64, head_dim_v=64, mixer="gdn", chunk_size=64)
    torch.manual_seed(0)
    oryx = OryxBlock(c).cuda().to(DT)
    T = 32768
    x = torch.randn(1, T, c.d_model, device="cuda", dtype=DT, requires_grad=True)
    dy = torch.randn_like(x)
    out = Path(os.environ.get("OUT", "runs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    for frac in (0.0, 0.1):
        m = torch.zeros(1, T, device="cuda", dtype=DT)
        if frac > 0:
            m[:, routed_positions(T, frac, seed=T)] = 1
        for _ in range(3):
            oryx(x, m).backward(dy)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            for _ in range(5):
                oryx(x, m).backward(dy)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / 5 * 1e3
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
        if os.environ.get("ORYX_PROFILE_TRACE"):  # a timeline of the five steps (host launches, device gaps)
            prof.export_chrome_trace(str(out / f"trace_layer_{int(frac * 100)}.json"))
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / 5 / 1e3
        head = f"Oryx layer T={T} attention {frac:.0%}: wall {wall:.2f} ms per fwd+bwd, device busy {busy:.2f} ms"
        print(head + "\n" + table, flush=True)
        (out / f"profile_layer_{int(frac * 100)}.txt").write_text(head + "\n" + table)
        notes.append(head)


# ----------------------------------------------------------------------------- ceilings
CEIL: dict[str, float] = {}


def measure_ceilings() -> None:
    """The two ceilings every floor below divides by, measured in this run on random data:
    device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 matmul rate."""
    src = torch.randn(2**30, device="cuda", dtype=DT)  # 2 GiB, far beyond L2
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    CEIL["copy_bytes_per_s"] = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    add("ceilings", "device copy 2 GiB bf16", "torch copy_", ms, copy_tb_s=round(CEIL["copy_bytes_per_s"] / 1e12, 3))
    del src, dst
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=DT), torch.randn(n, n, device="cuda", dtype=DT)
    ms = bench(lambda: a @ b)
    CEIL["bf16_flop_per_s"] = 2 * n**3 / (ms * 1e-3)
    add("ceilings", "bf16 matmul 8192^3", "torch matmul", ms, tflop_s=round(CEIL["bf16_flop_per_s"] / 1e12, 1))
    del a, b
    torch.cuda.empty_cache()


def bytes_floor_ms(n_bytes: float) -> float:
    return n_bytes / CEIL["copy_bytes_per_s"] * 1e3


def flop_floor_ms(flop: float) -> float:
    return flop / CEIL["bf16_flop_per_s"] * 1e3


# ----------------------------------------------------------------------------- step
def _step_state(model, N, S, state_dtype):
    """A steady state for N series: random contents, every slot holding a token, staggered positions."""
    state = model.init_state(N, state_dtype=state_dtype)
    for ls in state.layers:
        for t, std in ((ls.k_cache_BSHK, 0.125), (ls.v_cache_BSHV, 1), (ls.rec_BHKV, 0.1), (ls.conv_k_BWX, 1), (ls.conv_v_BWX, 1), (ls.conv_q_BWX, 1)):
            t.normal_(0, std)
    state.n_tokens_B.copy_(10_000 + torch.randint(0, 5_000, (N,), device="cuda"))
    state.slots.pos_BS.copy_(torch.arange(S, device="cuda").expand(N, S))
    state.slots.mode_BS.copy_(torch.rand(N, S, device="cuda") < 0.1)
    state.slots.pins_B.random_(0, 1000)
    return state


def _step_parts(model, state, m, c, floor):
    """The step's parts on the model's tensors, each x4 layers: the mixer prologue, the layer step, the
    GEMMs (step projection, o_proj, SwiGLU gate|up and down), and the layer steps and the GEMMs side by
    side on two streams. Returns the GEMMs' time and their FLOP floor (ms)."""
    from oryx_ts.kernels import step_triton as st

    b, N, mx = model.config.block, m.shape[0], model.blocks[0].mixer
    u = torch.randn(N, b.d_model, device="cuda", dtype=DT)
    proj, plan = F.linear(u, mx._step_weight()), state.plan_step(m, b.window, b.pinned)
    pro = dict(conv_weights=(mx.k_conv.weight, mx.v_conv.weight, mx.lin_q_conv.weight), a_log_H=mx.lin_A_log,
               conv_biases=(mx.k_conv.bias, mx.v_conv.bias, mx.lin_q_conv.bias), dt_bias_H=mx.lin_dt_bias,
               pos_B=state.n_tokens_B, rope_base=b.rope_base)
    lay = dict(write_slot_B=plan.write_slot_B, valid_BS=plan.valid_BS, route_B=m, scale_H=mx.att_log_temp.exp(),
               pin_B=plan.pin_B, pin_slot_B=plan.pin_slot_B)
    prologues = lambda: [st.mixer_prologue("gdn", proj, ls.rec_BHKV, tails=(ls.conv_k_BWX, ls.conv_v_BWX, ls.conv_q_BWX), **pro)  # noqa: E731
                         for ls in state.layers]
    ins = prologues()
    layer_steps = lambda: [st.gated_layer_step("gdn", x, ls.rec_BHKV, proj, mx.o_norm.weight, mx.o_norm.eps,  # noqa: E731
                                               k_cache_BSHK=ls.k_cache_BSHK, v_cache_BSHV=ls.v_cache_BSHV, **lay)
                           for ls, x in zip(state.layers, ins, strict=True)]
    ws = [(bl.mixer._step_weight(), bl.mixer.o_proj.weight, torch.cat([bl.mlp.gate.weight, bl.mlp.up.weight]), bl.mlp.down.weight)
          for bl in model.blocks]
    o_in, h_in = torch.randn(N, b.d_model, device="cuda", dtype=DT), torch.randn(N, ws[0][3].shape[1], device="cuda", dtype=DT)
    gemms = lambda: [(F.linear(u, a), F.linear(o_in, o), F.linear(u, g), F.linear(h_in, d)) for a, o, g, d in ws]  # noqa: E731
    flop = sum(2 * N * w.shape[0] * w.shape[1] for group in ws for w in group)
    side, cur = torch.cuda.Stream(), torch.cuda.current_stream()

    def side_by_side():
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            gemms()
        layer_steps()
        cur.wait_stream(side)

    t = {name: bench(fn) for name, fn in (("prologue", prologues), ("layer", layer_steps), ("gemm", gemms), ("both", side_by_side))}
    add("step", c, "mixer prologue kernels alone x4", t["prologue"])
    add("step", c, f"layer step + output gate ({st.LAUNCH['output_gate']}) alone x4", t["layer"], floor, "state-bytes floor",
        share_of_floor=round(floor / t["layer"], 3))
    add("step", c, "GEMMs alone x4: step projection, o_proj, MLP gate|up, down", t["gemm"], flop_floor_ms(flop),
        "FLOP floor at the measured matmul rate", gflop=round(flop / 1e9, 1))
    add("step", c, "layer steps and GEMMs on two streams, x4", t["both"], t["layer"] + t["gemm"], "the two one after the other")
    return t["gemm"], flop_floor_ms(flop)


def section_step():
    """`model.step` of a 4-layer model, 16,384 series at their own positions, bounded cache of 512 slots (448 + 64
    pinned), bf16 weights and cache: eager and from a CUDA graph (`GraphedStep`), fp32 and bf16 state, against the
    state-bytes floor; its parts (`_step_parts`), the bounds if its GEMMs overlap nothing; 1,024 series."""
    from oryx_ts.config import preset
    from oryx_ts.model import OryxForecaster
    from oryx_ts.step_graph import GraphedStep

    N, W, PIN = 16384, 448, 64
    cfg = preset("base", block=dict(n_layers=4, n_heads=8, head_dim_k=64, head_dim_v=64, mixer="gdn",
                                    retention="bounded", window=W, pinned=PIN),
                 tokenizer=dict(channels=8, patch_len=16), head=dict(horizon=16, quantiles=(0.1, 0.5, 0.9)))
    L, H, K, V, S = (b := cfg.block).n_layers, b.n_heads, b.head_dim_k, b.head_dim_v, W + PIN
    torch.manual_seed(0)
    model = OryxForecaster(cfg).cuda().to(DT).eval()
    with torch.no_grad():
        model.head.proj.weight.normal_(0, 0.02)
    patch = torch.randn(N, cfg.tokenizer.patch_len, cfg.tokenizer.channels, device="cuda")
    case = f"{N} series, {L} layers H{H} {K}x{V}, bounded cache {S}"
    cache_row = S * H * (K + V) * 2  # one series' bf16 cache, one layer
    tails = L * N * 3 * (b.conv_size - 1) * H * K * 2 * 2  # bf16 conv tails read and written (K == V here)
    writes = L * N * H * (K + V) * 2 + tails
    results, parts, floors = {}, {}, {}
    for sd, sd_name in ((None, "fp32 state"), (torch.bfloat16, "bf16 state")):
        rec_bytes = L * N * H * K * V * (4 if sd is None else 2) * 2  # recurrent state read and written
        add("step", case, f"state bytes per step, {sd_name} (no time): recurrent r+w {rec_bytes / 1e9:.2f} GB, "
            f"writes + conv tails r+w {writes / 1e9:.3f} GB", 0.0,
            rec_gb=round(rec_bytes / 1e9, 2), writes_gb=round(writes / 1e9, 3), cache_gb=round(L * N * cache_row / 1e9, 1))
        with torch.no_grad():
            state = _step_state(model, N, S, sd)
            for frac in (0.0, 0.1):
                m = (torch.rand(N, device="cuda") < frac).float()
                n_routed = int(m.sum())
                floor = bytes_floor_ms(rec_bytes + writes + L * n_routed * cache_row)
                c = f"{case}, {frac:.0%} attention ({n_routed} series)"
                model.step(patch, state, m)
                assert _dispatch.last_backend["mixer_step"] == "triton"
                results[(sd_name, frac, "eager")] = ms = bench(lambda: model.step(patch, state, m))
                add("step", c, f"model.step, {sd_name}", ms, floor, "state-bytes floor",
                    share_of_floor=round(floor / ms, 3), floor_ms=round(floor, 3))
                graphed = GraphedStep(model, state)
                results[(sd_name, frac, "graph")] = gms = bench(lambda: graphed(patch, m))
                add("step", c, f"model.step, {sd_name}, CUDA graph", gms, floor, "state-bytes floor",
                    share_of_floor=round(floor / gms, 3), graph_over_eager=round(gms / ms, 3))
                del graphed
                if frac == 0.0:
                    parts[sd_name], floors[sd_name] = _step_parts(model, state, m, c, floor), floor
            if sd is None and os.environ.get("ORYX_PROFILE_STEP"):  # where model.step's time goes, 0% attention
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        model.step(patch, state, torch.zeros(N, device="cuda"))
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=80)
                print(table, flush=True)
                Path(os.environ.get("OUT", "runs/bench"), "profile_step.txt").write_text(table)
            del state
            torch.cuda.empty_cache()
    for mode in ("eager", "graph"):
        add("step", case, f"model.step 10% / 0%, fp32 state, {mode}", results[("fp32 state", 0.1, mode)],
            results[("fp32 state", 0.0, mode)], "0%")
        add("step", case, f"model.step bf16 state / fp32 state, 0%, {mode}", results[("bf16 state", 0.0, mode)],
            results[("fp32 state", 0.0, mode)], "fp32 state")
    # what the step could reach if the GEMMs overlap nothing (the row above shows they do not): state floor + GEMMs
    f32, f16 = floors["fp32 state"], floors["bf16 state"]
    for label, g in zip(("as measured", "at the measured matmul rate"), parts["fp32 state"], strict=True):
        add("step", case, f"bound, 0%: fp32 state floor + GEMMs {label}", f32 + g, share_of_floor=round(f32 / (f32 + g), 3))
        add("step", case, f"bound, 0%: bf16 / fp32 state, floors + GEMMs {label}", f16 + g, f32 + g, "fp32 state bound")
    # a small batch, where the host bounds the eager step
    n_small = 1024
    with torch.no_grad():
        state, p_small = _step_state(model, n_small, S, None), patch[:n_small]
        model.step(p_small, state, None)
        ms = bench(lambda: model.step(p_small, state, None))
        graphed = GraphedStep(model, state)
        gms = bench(lambda: graphed(p_small, None))
    small = f"{n_small} series, {L} layers, bounded cache {S}, 0% attention"
    add("step", small, "model.step, fp32 state", ms)
    add("step", small, "model.step, fp32 state, CUDA graph", gms, ms, "eager")
    del state, graphed, model
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- main
SECTIONS = {"attention": section_attention, "mixers": section_mixers, "layer": section_layer, "step": section_step,
            "profile": section_profile}


def environment() -> dict:
    import importlib.metadata as md

    import triton

    env = dict(date=str(date.today()), device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda)
    for pkg in ("fla-core", "mamba-ssm", "tilelang"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def write(out: Path, env: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(dict(env=env, rows=rows, notes=notes), indent=1))
    lines = [f"device {env['device']}, torch {env['torch']}, triton {env['triton']}, fla {env['fla-core']}, "
             f"mamba-ssm {env['mamba-ssm']}, tilelang {env['tilelang']}, {env['date']}, bf16", "",
             "| section | case | impl | ms | ratio | to | share of floor |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['section']} | {r['case']} | {r['impl']} | {r['ms']:.3f} | {r.get('ratio', '')} | "
                     f"{r.get('ratio_to', '')} | {r.get('share_of_floor', '')} |")
    lines += [""] + [f"- {n}" for n in notes]
    (out / "gpu_bench.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="step,layer,attention,mixers")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip sections that start after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device")
    env = environment()
    print(env, flush=True)
    measure_ceilings()
    for name in args.sections.split(","):
        if time.time() - T0 > args.budget_s:
            notes.append(f"section {name} not run: time budget spent")
            continue
        t = time.time()
        try:
            SECTIONS[name]()
        except Exception as e:
            notes.append(f"section {name} failed: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
        print(f"== {name} took {time.time() - t:.0f} s", flush=True)
        write(Path(args.out), env)
    print("\n".join(Path(args.out, "gpu_bench.md").read_text().splitlines()[:200]))
    for n in notes:
        print("NOTE", n)


if __name__ == "__main__":
    main()
