"""Streams engine benchmark (CPU): latency per patch, throughput over many series, state bytes and RSS.

The `debug` preset with bounded retention (window 128 + 16 pinned), untrained, its zero-initialized
head randomized (as `tests/conftest.py::random_model`, so that forecasts and matured errors are
not trivially zero). Forecasters: the all-recurrent model (the `Engine` wraps it with `NoneRouter`)
and, where stated, `RoutedForecaster(model, FixedRouter(10))` (one token in ten in attention).
Every engine figure is set against a bare step of the same forecaster over the same number of
series in the same run, timed alternately with it so that both see the same machine load.

Sections (`--sections`, default all):
- `latency`: one series, one patch per call (ingest 8 rows, then `flush`): p50/p99 per patch,
  adaptation on and off, against a bare `step` of one series.
- `throughput`: N series (1,024 and 16,384) arriving in a seeded random order; each round every
  series gets one patch of 8 rows, then one `flush`. Series-patches per second through `flush` and
  through ingest + flush, against a bare batched `step` of N series. Medians over rounds; the
  routed variant is timed over whole multiples of 10 rounds (mean), so its attention rounds count.
- `state`: one series through the engine for up to 1M patches or `--state-seconds`, whichever
  comes first: `audit(id)["state_bytes"]` at log-spaced patch counts (bounded retention), and the
  same for retention `all` over a shorter span, for contrast. Plotted to `--plot`.
- `rss` (run second, before anything allocates many series): 1,024 series for up to 10M patches
  or `--rss-seconds`: resident set size (/proc/self/statm) every `--rss-every` rounds; warm-up is
  the first 20% of the rounds.
- `profile`: cProfile over `flush` rounds at 1,024 series; the share of time in the engine's own
  functions (oryx_ts/streams/engine.py) and in the forecaster's step.

Figures that a time limit cut short are reported as reached (patches, rounds), never extrapolated.
Writes `<out>/streams_<date>.json` and the PNG.

    python benchmarks/streams.py [--quick] [--threads 2] [--sections latency,throughput,state,rss,profile]
                                 [--out benchmarks/results] [--plot docs/streams_state_bytes.png]
"""

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import subprocess
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

import oryx_ts
from oryx_ts.routers import FixedRouter, RoutedForecaster
from oryx_ts.streams.adapter import AdapterConfig
from oryx_ts.streams.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("latency", "throughput", "state", "rss", "profile")
RETENTION = {"retention": "bounded", "window": 128, "pinned": 16}
TARGETS = {"latency_p50_ms": 1.0, "rate_1024": 100_000.0, "flush_over_bare": 1.2}


def build_model(retention: dict, seed: int = 0) -> oryx_ts.OryxForecaster:
    torch.manual_seed(seed)
    model = oryx_ts.OryxForecaster(oryx_ts.preset("debug", block=retention))
    with torch.no_grad():
        model.head.proj.weight.normal_(0, 0.2)
        model.head.proj.bias.normal_(0, 0.2)
    return model.eval()


def forecaster_of(model, variant: str):
    return RoutedForecaster(model, FixedRouter(10)) if variant.startswith("routed") else model


def bare_step(forecaster, B: int, compiled: bool = False):
    """A closure stepping a plain state of B series with one fresh patch each: the reference the engine is held to."""
    state = forecaster.init_state(B)
    patch = torch.randn(B, 8, 4)
    if isinstance(forecaster, RoutedForecaster):
        return lambda: forecaster.step(patch, state)
    step = torch.compile(forecaster.step, dynamic=False) if compiled else forecaster.step
    return lambda: step(patch, state, None)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Feed:
    """Series s0..s{B-1} on a unit grid; `round()` ingests one patch of 8 rows per series in a fresh random order."""

    def __init__(self, engine: Engine, B: int, seed: int):
        self.engine, self.B, self.t = engine, B, 0
        self.rng = np.random.default_rng(seed)
        self.ids = [f"s{i}" for i in range(B)]
        for sid in self.ids:
            engine.add_series(sid, step=1, origin=0)

    def round(self) -> float:
        """Ingest one patch per series; returns the seconds ingest took (values are drawn before the clock starts)."""
        values = self.rng.standard_normal((self.B, 8, 4), dtype=np.float32)
        order = self.rng.permutation(self.B)
        ts = np.arange(self.t, self.t + 8)
        t0 = time.perf_counter()
        for i in order:
            self.engine.ingest(self.ids[i], ts, values[i])
        self.t += 8
        return time.perf_counter() - t0


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def pct(x: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(x), q))


# --- sections ---------------------------------------------------------------------------------


def run_latency(model, variants, n: int, warmup: int) -> list[dict]:
    rows = []
    for variant in variants:
        for adapt in (True, False):
            fc = forecaster_of(model, variant)
            compiled = variant.endswith("compiled")
            engine = Engine(fc, adapter=AdapterConfig(enabled=adapt), compile=compiled)
            feed = Feed(engine, 1, seed=1)
            bare = bare_step(fc, 1, compiled)
            eng_t, bare_t = [], []
            for k in tqdm(range(warmup + n), desc=f"latency {variant} adapt={adapt}", leave=False, disable=None):
                t0 = time.perf_counter()
                feed.round()
                engine.flush()
                e = time.perf_counter() - t0
                b = timed(bare)
                if k >= warmup:
                    eng_t.append(e)
                    bare_t.append(b)
            # the routed variant's p50 is a recurrent token; its p99 includes the attention ones
            rows.append({
                "variant": variant, "adapter": adapt, "patches": n,
                "p50_ms": pct(eng_t, 50) * 1e3, "p99_ms": pct(eng_t, 99) * 1e3,
                "bare_p50_ms": pct(bare_t, 50) * 1e3, "bare_p99_ms": pct(bare_t, 99) * 1e3,
                "p50_over_bare": pct(eng_t, 50) / pct(bare_t, 50),
            })
    return rows


def run_throughput(model, cases, warmup: int) -> list[dict]:
    """`cases`: (variant, adapter on, series, timed rounds)."""
    rows = []
    for variant, adapt, B, rounds in cases:
        fc = forecaster_of(model, variant)
        engine = Engine(fc, adapter=AdapterConfig(enabled=adapt))
        feed = Feed(engine, B, seed=2)
        bare = bare_step(fc, B)
        ing, fl, br = [], [], []
        for k in tqdm(range(warmup + rounds), desc=f"throughput {variant} adapt={adapt} B={B}", leave=False, disable=None):
            i = feed.round()
            f = timed(engine.flush)
            b = timed(bare)
            if k >= warmup:
                ing.append(i)
                fl.append(f)
                br.append(b)
        # the routed schedule puts every 10th round in attention: average whole cycles instead of a median
        stat = np.median if variant == "recurrent" else np.mean
        f, i, b = float(stat(fl)), float(stat(ing)), float(stat(br))
        rows.append({
            "variant": variant, "adapter": adapt, "series": B, "rounds": rounds, "statistic": stat.__name__,
            "flush_s": f, "ingest_s": i, "bare_step_s": b,
            "flush_rate": B / f, "ingest_flush_rate": B / (i + f), "bare_rate": B / b,
            "flush_over_bare": f / b, "ingest_flush_over_bare": (i + f) / b,
        })
    return rows


def run_state(retention: dict, max_patches: int, seconds: float, compiled: bool = False) -> dict:
    """One series through the engine (adaptation on) until `max_patches` or `seconds`; state bytes at log-spaced counts."""
    engine = Engine(build_model(retention), compile=compiled)
    feed = Feed(engine, 1, seed=3)
    marks = set(np.unique(np.round(np.logspace(0, np.log10(max_patches), 61)).astype(int)).tolist())
    samples = []
    t0 = time.perf_counter()
    n = 0
    bar = tqdm(total=max_patches, desc=f"state bytes ({retention['retention']})", leave=False, disable=None)
    while n < max_patches:
        feed.round()
        engine.flush()
        n += 1
        bar.update()
        over = time.perf_counter() - t0 > seconds
        if n in marks or over:
            pool_bytes = sum(t.numel() * t.element_size() for t in engine.pool.tensors().values())
            samples.append([n, engine.audit("s0")["state_bytes"], pool_bytes])
        if over:
            break
    bar.close()
    return {"retention": retention["retention"], "target_patches": max_patches, "patches_reached": n,
            "seconds": time.perf_counter() - t0, "samples": samples,
            "state_bytes_at": {str(k): next((s[1] for s in samples if s[0] == k), None) for k in (1_000, 100_000, 1_000_000)}}


def run_rss(model, B: int, max_patches: int, seconds: float, every: int) -> dict:
    engine = Engine(model)
    feed = Feed(engine, B, seed=4)
    samples = [[0, 0, rss_bytes()]]
    t0 = time.perf_counter()
    rounds = 0
    bar = tqdm(total=max_patches // B, desc=f"rss, {B} series", leave=False, disable=None)
    while rounds * B < max_patches and time.perf_counter() - t0 < seconds:
        feed.round()
        engine.flush()
        rounds += 1
        bar.update()
        if rounds % every == 0:
            samples.append([rounds, rounds * B, rss_bytes()])
    bar.close()
    if samples[-1][0] != rounds:
        samples.append([rounds, rounds * B, rss_bytes()])
    after = [s for s in samples if s[0] >= 0.2 * rounds and s[0] > 0]
    r, v = np.array([s[0] for s in after], float), np.array([s[2] for s in after], float)
    slope = float(np.polyfit(r, v, 1)[0]) * 1000 if len(after) >= 3 else float("nan")
    return {"series": B, "target_patches": max_patches, "rounds": rounds, "patches": rounds * B,
            "seconds": time.perf_counter() - t0, "samples": samples, "warmup_rounds": int(0.2 * rounds),
            "rss_first_after_warmup": int(v[0]), "rss_last": int(v[-1]), "rss_max_after_warmup": int(v.max()),
            "rss_min_after_warmup": int(v.min()), "slope_bytes_per_1k_rounds": slope}


def run_profile(model, B: int, rounds: int, warmup: int) -> dict:
    engine = Engine(model)
    feed = Feed(engine, B, seed=5)
    for _ in range(warmup):
        feed.round()
        engine.flush()
    prof = cProfile.Profile()
    for _ in range(rounds):
        feed.round()
        prof.enable()
        engine.flush()
        prof.disable()
    st = pstats.Stats(prof)
    total = st.total_tt
    funcs = []
    for (file, line, name), (cc, nc, tt, ct, _) in st.stats.items():
        funcs.append({"function": f"{Path(file).name}:{line}({name})" if line else name, "file": file,
                      "calls": nc, "tottime_share": tt / total, "cumtime_share": ct / total})
    in_engine = [f for f in funcs if f["file"].endswith("oryx_ts/streams/engine.py")]
    step = [f for f in funcs if f["function"].startswith(("runtime.py", "model.py")) and f["function"].endswith("(step)")]
    top = sorted(funcs, key=lambda f: -f["tottime_share"])[:15]
    for f in (*top, *in_engine):
        f.pop("file", None)
    st.calc_callees()
    callees = {}
    for (file, line, name), calls in st.all_callees.items():
        if file.endswith("oryx_ts/streams/engine.py") and name in ("_step", "_mature"):
            rows = [(f"{Path(f).name}:{ln}({n})" if ln else n, v[3] / total) for (f, ln, n), v in calls.items()]
            callees[name] = dict(sorted(rows, key=lambda r: -r[1])[:10])
    return {"series": B, "rounds": rounds, "profiled_s_per_flush": total / rounds,
            "engine_own_tottime_share": sum(f["tottime_share"] for f in in_engine),
            "forecaster_step_cumtime_share": {f["function"]: f["cumtime_share"] for f in step},
            "engine_functions": sorted(in_engine, key=lambda f: -f["cumtime_share"]), "top_tottime": top,
            "callees_cumtime_share": callees}


# --- report -----------------------------------------------------------------------------------


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--short", "oryx_ts"], capture_output=True, text=True, cwd=ROOT).stdout.split("\n")
    return {"nproc": os.cpu_count(), "cpu": model_name, "torch": torch.__version__, "python": platform.python_version(),
            "commit": commit, "uncommitted_package_files": [ln.strip() for ln in dirty if ln.strip()], "loadavg_start": os.getloadavg()}


def targets(result: dict) -> list[dict]:
    out = []
    lat = next((r for r in result.get("latency", []) if r["variant"] == "recurrent" and r["adapter"]), None)
    if lat:
        out.append({"target": "one series, p50 per patch <= 1 ms (adaptation on)", "measured": f"{lat['p50_ms']:.2f} ms",
                    "met": lat["p50_ms"] <= TARGETS["latency_p50_ms"], "by": lat["p50_ms"] / TARGETS["latency_p50_ms"]})
    for r in result.get("throughput", []):
        if r["variant"] != "recurrent" or not r["adapter"]:
            continue
        if r["series"] == 1024:
            out.append({"target": "1,024 series, >= 100,000 series-patches/s through flush", "measured": f"{r['flush_rate']:,.0f}/s",
                        "met": r["flush_rate"] >= TARGETS["rate_1024"], "by": TARGETS["rate_1024"] / r["flush_rate"]})
        out.append({"target": f"{r['series']:,} series, flush <= 1.2x bare step", "measured": f"{r['flush_over_bare']:.2f}x",
                    "met": r["flush_over_bare"] <= TARGETS["flush_over_bare"], "by": r["flush_over_bare"] / TARGETS["flush_over_bare"]})
    st = result.get("state", {}).get("bounded")
    if st:
        sizes = {s[1] for s in st["samples"]}
        out.append({"target": "state bytes per series constant (bounded retention)",
                    "measured": f"{sorted(sizes)} B over {st['patches_reached']:,} patches", "met": len(sizes) == 1, "by": None})
    rss = result.get("rss")
    if rss:
        drift = rss["rss_max_after_warmup"] - rss["rss_min_after_warmup"]
        out.append({"target": f"engine RSS constant after warm-up ({rss['series']:,} series)",
                    "measured": f"{rss['rss_min_after_warmup'] / 2**20:.1f}-{rss['rss_max_after_warmup'] / 2**20:.1f} MiB over {rss['patches']:,} patches",
                    "met": drift <= 0.02 * rss["rss_min_after_warmup"], "by": None})
    return out


def plot_state(state: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, res in state.items():
        s = np.array([[a, b] for a, b, _ in res["samples"]], float)
        ax.plot(s[:, 0], s[:, 1] / 1024, marker=".", label=f"retention {name} (reached {res['patches_reached']:,} patches)")
    ax.set_xscale("log")
    ax.set_xlabel("patches consumed by the series")
    ax.set_ylabel("state per series (KiB)")
    ax.set_title("oryx_ts Engine, debug preset: state bytes per series")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_tables(result: dict) -> None:
    if result.get("latency"):
        print("\n| variant | adaptation | p50 ms | p99 ms | bare step p50 ms | bare p99 ms | p50 / bare |")
        print("|---|---|---|---|---|---|---|")
        for r in result["latency"]:
            print(f"| {r['variant']} | {'on' if r['adapter'] else 'off'} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                  f"{r['bare_p50_ms']:.2f} | {r['bare_p99_ms']:.2f} | {r['p50_over_bare']:.2f}x |")
    if result.get("throughput"):
        print("\n| variant | adaptation | series | flush patches/s | ingest+flush patches/s | bare step patches/s | flush / bare | ingest+flush / bare |")
        print("|---|---|---|---|---|---|---|---|")
        for r in result["throughput"]:
            print(f"| {r['variant']} | {'on' if r['adapter'] else 'off'} | {r['series']:,} | {r['flush_rate']:,.0f} | "
                  f"{r['ingest_flush_rate']:,.0f} | {r['bare_rate']:,.0f} | {r['flush_over_bare']:.2f}x | {r['ingest_flush_over_bare']:.2f}x |")
    for name, st in result.get("state", {}).items():
        at = ", ".join(f"{k}: {'not reached' if v is None else f'{v:,} B'}" for k, v in st["state_bytes_at"].items())
        print(f"\nstate bytes per series, retention {name}: {st['samples'][-1][1]:,} B after {st['patches_reached']:,} patches "
              f"({st['seconds']:.0f} s); at {at}")
    if result.get("rss"):
        r = result["rss"]
        print(f"\nRSS, {r['series']:,} series: {r['rounds']:,} rounds = {r['patches']:,} patches in {r['seconds']:.0f} s; after warm-up "
              f"{r['rss_min_after_warmup'] / 2**20:.1f}-{r['rss_max_after_warmup'] / 2**20:.1f} MiB, "
              f"slope {r['slope_bytes_per_1k_rounds'] / 2**10:+.1f} KiB per 1k rounds")
    if result.get("profile"):
        p = result["profile"]
        print(f"\nprofile, {p['series']:,} series, {p['rounds']} flushes ({p['profiled_s_per_flush'] * 1e3:.1f} ms each under cProfile): "
              f"engine.py's own time {100 * p['engine_own_tottime_share']:.1f}%, step {p['forecaster_step_cumtime_share']}")
        for f in p["engine_functions"][:8]:
            print(f"  {f['function']}: cum {100 * f['cumtime_share']:.1f}%, own {100 * f['tottime_share']:.1f}%, {f['calls']} calls")
        for name, calls in p["callees_cumtime_share"].items():
            print(f"  inside {name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in calls.items()))
        print("  top by own time:")
        for f in p["top_tottime"][:10]:
            print(f"  {f['function']}: own {100 * f['tottime_share']:.1f}%, {f['calls']} calls")
    if result.get("targets"):
        print("\n| target | measured | met? |")
        print("|---|---|---|")
        for t in result["targets"]:
            print(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a CI smoke run (< 30 s)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--compile", action="store_true", help="also time Engine(compile=True) (torch.compile; compiles for a minute first)")
    ap.add_argument("--routed", action=argparse.BooleanOptionalAction, default=True, help="also time RoutedForecaster(model, FixedRouter(10))")
    ap.add_argument("--out", type=Path, default=None, help="JSON folder (default benchmarks/results, --quick: runs/streams_quick)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG (default docs/streams_state_bytes.png, --quick: next to the JSON)")
    ap.add_argument("--state-seconds", type=float, default=None)
    ap.add_argument("--rss-seconds", type=float, default=None)
    ap.add_argument("--rss-every", type=int, default=None, help="rounds between RSS samples")
    args = ap.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    if unknown := set(sections) - set(SECTIONS):
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    q = args.quick
    out = args.out or (ROOT / ("runs/streams_quick" if q else "benchmarks/results"))
    plot = args.plot or (out / "streams_state_bytes.png" if q else ROOT / "docs/streams_state_bytes.png")
    torch.set_num_threads(args.threads)
    model = build_model(RETENTION)
    variants = ("recurrent", "routed") if args.routed else ("recurrent",)
    if args.compile:
        variants += ("recurrent-compiled",)
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    result = {"date": date, "quick": q, "threads": args.threads, "preset": "debug", "block": RETENTION,
              "machine": machine(), "sections": sections}
    t_start = time.perf_counter()
    if "latency" in sections:
        result["latency"] = run_latency(model, variants, n=20 if q else 500, warmup=3 if q else 30)
    # RSS before the sections that allocate 16,384 series, so that their high-water mark does not mask its warm-up
    if "rss" in sections:
        result["rss"] = run_rss(model, 32 if q else 1024, 10_000_000, args.rss_seconds or (2 if q else 200),
                                args.rss_every or (2 if q else 10))
    if "throughput" in sections:
        sizes = (32, 128) if q else (1024, 16384)
        cases = [("recurrent", True, B, 2 if q else (9 if B <= 1024 else 3)) for B in sizes]
        cases += [("recurrent", False, sizes[0], 2 if q else 9)]
        if args.routed and not q:
            cases += [("routed", True, sizes[0], 10)]
        result["throughput"] = run_throughput(model, cases, warmup=1 if q else 2)
    if "state" in sections:
        secs = args.state_seconds or (1 if q else 120)
        result["state"] = {"bounded": run_state(RETENTION, 1_000_000, secs, args.compile),
                           "all": run_state({"retention": "all"}, 1_000_000, min(secs / 5, 300))}
        plot_state(result["state"], plot)
        result["plot"] = str(plot)
    if "profile" in sections:
        result["profile"] = run_profile(model, 32 if q else 1024, rounds=1 if q else 5, warmup=1 if q else 2)
    result["targets"] = targets(result)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - t_start
    print_tables(result)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"streams_{date}.json" if sections == list(SECTIONS) else f"streams_{date}_{'_'.join(sections)}.json")
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path} ({result['seconds']:.0f} s; load average {result['machine']['loadavg_start']} -> {result['machine']['loadavg_end']})")


if __name__ == "__main__":
    main()
