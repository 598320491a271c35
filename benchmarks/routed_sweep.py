"""Routed-attention launch configurations across shapes, FlexAttention timed in the same run (issue 18).

The shapes of `gpu.py`'s attention section (B, T, H, D; 10% and 25% of the queries routed; the same
inputs, seeds and FlexAttention setup: compiled, on the gathered queries, block mask built once).
Per shape and fraction: FlexAttention's forward and forward+backward, ours with the default launch
configuration, then one knob at a time, greedily, a variant kept when at least MARGIN faster:
the forward's split waves, then its tiles (timed by the forward), then the dq pass's split waves
and tiles and the dk/dv pass's tiles, then the fused backward on its tiles (timed by fwd+bwd); then the combined choice, timed like the
default. Every variant's output and gradients are compared with Flex's (relative error). The default
and the choice also get the host time of one call (enqueue only, median) and, at the end, their
device time (torch.profiler, kernels summed, L2 warm), which tell launch-bound rows from
device-bound ones. At T=32768 the fastest full causal SDPA (cuDNN, flash) is timed for the
targets' ratios. Medians of `triton.testing.do_bench` (ms); fwd runs with grad enabled (as `gpu.py`
times it). Writes `routed_sweep.json` (every timing) to `--out` after each one; starts no new
variant past `--budget-s` (minus the profiling reserve).

Usage: python benchmarks/routed_sweep.py [--out DIR] [--budget-s 200] [--shapes 0,1,2,3] [--dry]
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(2, 8192, 8, 64), (2, 8192, 16, 128), (1, 32768, 8, 128), (1, 32768, 8, 64)]  # most to gain first
FRACS = (0.1, 0.25)
MARGIN = 0.02
WAVES = (1, 2, 4, 8, 16)  # the default among them is skipped (same launch)
TRY = {  # tiles tried per pass and head width besides the default: (BLOCK_M, BLOCK_N, num_warps, num_stages);
    # FlexAttention's own on sm90 among them (fwd D64 128/128/4/3, D128 128/64/8/3; bwd 64x128 dk/dv, 128x64 dq, 8 warps)
    64: dict(fwd=[(128, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3)],
             dq=[(64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3)],
             dkdv=[(64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 4, 3)]),
    128: dict(fwd=[(128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 8, 3)],
              dq=[(128, 64, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)],
              dkdv=[(32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 8, 3)]),
}
QUICK = dict(warmup=10, rep=50)  # do_bench for the variants; the default and the choice get gpu.py's 25 / 100
PROFILE_RESERVE_S = 25
DEV, DT = "cuda", "bfloat16"  # a CPU smoke test of this script sets "cpu", "float32" (Triton interpreter)


def stages(D):
    """The greedy order: (name, timed metric, variants as launch overrides)."""
    return [("fwd waves", "fwd", [{"waves_fwd": w} for w in WAVES]),
            ("fwd tile", "fwd", [{"fwd": t} for t in TRY[D]["fwd"]]),
            ("dq waves", "fb", [{"waves_dq": w} for w in WAVES]),
            ("dq tile", "fb", [{"dq": t} for t in TRY[D]["dq"]]),
            ("dkdv tile", "fb", [{"dkdv": t} for t in TRY[D]["dkdv"]]),
            # the fused backward (dq by atomic adds in the dk/dv kernel), on its default tile and the dkdv tiles
            ("fused dq", "fb", [{"fuse_dq": True}] + [{"fuse_dq": True, "dkdv_fused": t} for t in TRY[D]["dkdv"]])]


class Run:
    def __init__(self, out: Path, budget_s: float, env: dict):
        self.out, self.t0, self.budget = out, time.time(), budget_s
        self.until = budget_s  # the current shape's share of the budget (elapsed seconds)
        self.doc = dict(env=env, rows=[], choices=[], sdpa=[], profiles=[], notes=[])

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self, reserve=PROFILE_RESERVE_S) -> bool:
        return self.elapsed() < min(self.budget - reserve, self.until)

    def add(self, kind, **row):
        row["t_s"] = round(self.elapsed(), 1)
        self.doc[kind].append(row)
        print(kind, json.dumps(row), flush=True)
        self.save()

    def save(self):
        (self.out / "routed_sweep.json").write_text(json.dumps(self.doc, indent=1))


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def host_us(fn, n=15) -> float:
    import torch

    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return round(statistics.median(ts) * 1e6, 1)


def device_us(fn, n=5) -> dict:
    """Device time per call, every kernel summed (and the five largest by name), from torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = getattr(e, "self_cuda_time_total", 0.0) if us is None else us
        if us:
            per[e.key[:60]] = round(us / n, 1)
    top = dict(sorted(per.items(), key=lambda kv: -kv[1])[:5])
    return dict(device_us=round(sum(per.values()), 1), top=top)


def host_profile(fn, n=200) -> list[str]:
    """Where one call's host time goes: cProfile over n calls, the 15 largest by own time (us per call)."""
    import cProfile
    import pstats

    import torch

    fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(pr).stats
    top = sorted(st.items(), key=lambda kv: -kv[1][2])[:15]
    return [f"{tt / n * 1e6:.1f} us own, {ct / n * 1e6:.1f} us cum, {nc // n}x: {Path(f).name}:{ln} {name}"
            for (f, ln, name), (_, nc, tt, ct, _) in top]


class Case:
    """One shape and routed fraction: our inputs, FlexAttention's (transposed copies) and its reference."""

    def __init__(self, B, T, H, D, frac, q_full, k, v, flex):
        import torch
        from torch.nn.attention.flex_attention import create_block_mask

        from gpu import routed_positions
        from oryx_ts.kernels.attention import routed_triton as rt

        self.B, self.T, self.H, self.D, self.frac = B, T, H, D, frac
        self.q_pos = q_pos = routed_positions(T, frac, seed=T + D)
        self.Tq = q_pos.numel()
        self.label = f"B{B} T{T} H{H} D{D} routed {frac:.0%} (Tq={self.Tq})"
        self.q = q_full[:, q_pos].detach().requires_grad_()
        self.k, self.v = k, v
        self.do = torch.randn(B, self.Tq, H, D, device=DEV, dtype=q_full.dtype)
        self.kw = dict(q_pos_Tq=q_pos, k_pos_S=torch.arange(T, device=DEV),
                       scale_H=torch.full((H,), 1.0 / math.sqrt(D), device=DEV))
        self.qf = self.q.detach().transpose(1, 2).contiguous().requires_grad_()
        self.kf, self.vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (k, v))

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_pos[q_idx]

        block_mask = create_block_mask(mask_mod, None, None, self.Tq, T, device=DEV)
        do_f = self.do.transpose(1, 2)
        fl = lambda: flex(self.qf, self.kf, self.vf, block_mask=block_mask, scale=1.0 / math.sqrt(D))  # noqa: E731
        self.flex = dict(fwd=fl, fb=lambda: fl().backward(do_f))
        ours = lambda: rt.routed_attention_triton(self.q, self.k, self.v, **self.kw)  # noqa: E731
        self.ours = dict(fwd=ours, fb=lambda: ours().backward(self.do))
        ref = self.grads(fl, (self.qf, self.kf, self.vf), do_f)
        self.ref = [t.transpose(1, 2) for t in ref]  # in our layout [B, T, H, D]
        self.best, self.best_ms, self.seen = {}, {}, set()

    @staticmethod
    def grads(fn, leaves, do):
        for t in leaves:
            t.grad = None
        o = fn()
        o.backward(do)
        out = [o.detach().float()] + [t.grad.float() for t in leaves]
        for t in leaves:
            t.grad = None
        return out

    def errors(self) -> dict:
        got = self.grads(self.ours["fwd"], (self.q, self.k, self.v), self.do)
        return {f"err_{n}": float(f"{rel(a, b):.3g}") for n, a, b in zip(("o", "dq", "dk", "dv"), got, self.ref)}

    def nsplit(self, kernel) -> int:
        from oryx_ts.kernels.attention import routed_triton as rt

        (bm, bn, _, _), waves = rt._launch(kernel, self.q.dtype, self.D)
        return rt._n_split(math.ceil(self.Tq / bm) * self.B * self.H, self.T, bn, self.q.device, waves)[0]

    def launch_key(self, kernel) -> tuple:
        """What a pass launches under the current overrides: (pass, tile, pieces)."""
        from oryx_ts.kernels.attention import routed_triton as rt

        if kernel == "fused":  # the "fused dq" stage: whether the backward is fused, and its dk/dv tile
            return kernel, rt._fuse_dq(self.q.dtype, self.D), tuple(rt._launch("dkdv_fused", self.q.dtype, self.D)[0])
        tile = rt._launch(kernel, self.q.dtype, self.D)[0]
        return kernel, tuple(tile), self.nsplit(kernel) if kernel != "dkdv" else 0


def forced(cfg):
    """Context: the launch overrides of cfg in routed_triton._FORCE."""
    from contextlib import contextmanager

    from oryx_ts.kernels.attention import routed_triton as rt

    @contextmanager
    def cm():
        rt._FORCE.clear()
        rt._FORCE.update(cfg)
        try:
            yield
        finally:
            rt._FORCE.clear()

    return cm()


def measure(run, c, label, cfg, metrics, full=False, host=False):
    """Time ours under cfg; returns {metric: ms} (empty on an error, which is recorded)."""
    from gpu import bench

    kw = {} if full else QUICK
    row = dict(case=c.label, variant=label, cfg={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()})
    try:
        with forced(cfg):
            row.update(nsplit_fwd=c.nsplit("fwd"), nsplit_dq=c.nsplit("dq"))
            row.update(c.errors())
            for m in metrics:
                row[m] = round(bench(c.ours[m], **kw), 4)
            if host:
                row.update({f"host_{m}_us": host_us(c.ours[m]) for m in metrics})
    except Exception as e:  # e.g. out of shared memory
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    row.update({f"flex_{m}": c.flex_ms[m] for m in metrics})
    run.add("rows", **row)
    return {m: row[m] for m in metrics if m in row}


def sweep_shape(run, B, T, H, D, flex, cases_out):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gpu import bench

    torch.manual_seed(0)
    dt = getattr(torch, DT)
    q_full = F.normalize(torch.randn(B, T, H, D, device=DEV), dim=-1).to(dt)
    k = F.normalize(torch.randn(B, T, H, D, device=DEV), dim=-1).to(dt).requires_grad_()
    v = torch.randn(B, T, H, D, device=DEV, dtype=dt).requires_grad_()
    if T >= 32768:  # the targets' baseline: the fastest full causal SDPA
        qh, kh, vh = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q_full, k, v))
        do_full = torch.randn_like(qh)
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    f = lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)  # noqa: E731
                    f()
                    run.add("sdpa", shape=f"B{B} T{T} H{H} D{D}", backend=name, fwd=round(bench(f), 4),
                            fb=round(bench(lambda: f().backward(do_full)), 4))
            except Exception as e:
                run.doc["notes"].append(f"SDPA {name} B{B} T{T} H{H} D{D}: {type(e).__name__}: {str(e)[:120]}")
        del qh, kh, vh, do_full
    cases = []
    for frac in FRACS:
        t = time.time()
        c = Case(B, T, H, D, frac, q_full, k, v, flex)
        c.flex_ms = {m: round(bench(fn), 4) for m, fn in c.flex.items()}
        run.add("rows", case=c.label, variant="flex", compile_s=round(time.time() - t, 1), **c.flex_ms,
                **{f"host_{m}_us": host_us(fn) for m, fn in c.flex.items()})
        c.best_ms = measure(run, c, "default", {}, ("fwd", "fb"), full=True, host=True)
        c.seen = {c.launch_key(kernel) for kernel in ("fwd", "dq", "dkdv")}
        if not run.doc.get("host_profile"):  # the first (smallest) shape: where our host time goes
            run.doc["host_profile"] = dict(case=c.label, **{m: host_profile(fn) for m, fn in c.ours.items()},
                                           **{f"flex_{m}": host_profile(fn) for m, fn in c.flex.items()})
        c.default_ms = dict(c.best_ms)
        cases.append(c)
        cases_out.append(c)
    for name, metric, variants in stages(D):
        if name == "dq waves":  # the fwd+bwd of the forward's choice, the reference for the backward's variants
            for c in cases:
                if c.best:
                    c.best_ms.update(measure(run, c, "fwd choice", c.best, ("fb",)))
        for var in variants:
            for c in cases:
                if not run.left() or metric not in c.best_ms:
                    continue
                cfg = {**c.best, **var}
                with forced(cfg):
                    key = c.launch_key(name.split()[0])
                if key in c.seen:  # the same launch as one already timed (e.g. waves capped by the key count)
                    continue
                c.seen.add(key)
                ms = measure(run, c, f"{name} {list(var.values())[-1]}", cfg, (metric,))
                if metric in ms and ms[metric] < (1 - MARGIN) * c.best_ms[metric]:
                    c.best, c.best_ms[metric] = cfg, ms[metric]
    for c in cases:
        run.until = run.budget  # the choice is timed past the shape's share (taken from the next shapes')
        if run.left(reserve=PROFILE_RESERVE_S / 2):
            ms = measure(run, c, "choice", c.best, ("fwd", "fb"), full=True, host=True)
            run.add("choices", case=c.label, cfg={k: list(v) if isinstance(v, tuple) else v for k, v in c.best.items()},
                    flex=c.flex_ms, default=c.default_ms, choice=ms,
                    vs_flex_default={m: round(c.default_ms[m] / c.flex_ms[m], 3) for m in c.default_ms},
                    vs_flex_choice={m: round(ms[m] / c.flex_ms[m], 3) for m in ms})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench"))
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--shapes", default=",".join(str(i) for i in range(len(SHAPES))), help="indices into SHAPES")
    ap.add_argument("--code", default="", help="the commit timed, recorded in the output")
    ap.add_argument("--dry", action="store_true", help="print the plan, touch no GPU")
    args = ap.parse_args()
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    if args.dry:
        for B, T, H, D in shapes:
            print(f"B{B} T{T} H{H} D{D} x {FRACS}:", "; ".join(f"{n} ({m}): {len(v)}" for n, m, v in stages(D)))
        return
    import torch
    import triton
    from torch.nn.attention.flex_attention import flex_attention

    for knob in ("cache_size_limit", "recompile_limit"):  # one compile of Flex per shape and fraction
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(date=time.strftime("%Y-%m-%d", time.gmtime()), device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda, code=args.code, margin=MARGIN,
               do_bench=dict(variants=QUICK, default_and_choice=dict(warmup=25, rep=100)))
    run = Run(out, args.budget_s, env)
    flex = torch.compile(flex_attention, dynamic=False)
    cases = []
    for i, (B, T, H, D) in enumerate(shapes):
        # each shape gets an equal share of what is left, so every shape is reached (its later stages may be cut)
        run.until = run.elapsed() + (args.budget_s - PROFILE_RESERVE_S - run.elapsed()) / (len(shapes) - i)
        if not run.left():
            run.doc["notes"].append(f"B{B} T{T} H{H} D{D}: not reached within the budget")
            continue
        sweep_shape(run, B, T, H, D, flex, cases)
        torch.cuda.empty_cache()
    for c in cases:  # device time of Flex, the default and the choice
        for impl, cfg in (("flex", None), ("default", {}), ("choice", c.best)):
            for m in ("fwd", "fb"):
                if run.elapsed() > args.budget_s:
                    break
                try:
                    if cfg is None:
                        prof = device_us(c.flex[m])
                    else:
                        with forced(cfg):
                            prof = device_us(c.ours[m])
                    run.add("profiles", case=c.label, impl=impl, metric=m, **prof)
                except Exception as e:
                    run.doc["notes"].append(f"profile {c.label} {impl} {m}: {type(e).__name__}: {str(e)[:120]}")
    run.doc["elapsed_s"] = round(run.elapsed(), 1)
    run.save()


if __name__ == "__main__":
    main()
