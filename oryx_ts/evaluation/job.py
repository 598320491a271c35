"""A whole backtest job: data, split by time, the oryx model replayed through the engine, peers, scores.

Legend: L raw steps, T tokens, N scored origins, Hz horizon, C channels, Q quantile levels.

The stream is split by time into train `[0, a)`, validation `[a, b)` and test `[b, L)`. The oryx model
is a checkpoint or is trained here on `[0, b)` (its own validation tail is `[a, b)`); the peers are
fitted on `[0, b)` too. The replay starts at row `s` (`s = b mod P`, or later with `warmup_tokens`),
so the history before the test part is warm-up context and token boundaries fall on `b`: an origin
is the last row of a token, and the scored origins are those from `b - 1` on whose whole horizon
lies inside the stream (every `origin_stride`-th of them). Every model is scored at exactly those
origins against the same targets; peers see only the rows up to each origin.

Oryx's forecasts come from `backtest_streams` (the engine, the service's code path). With
`path="prefill"` (routers that read no surprise) the stream is replayed in parallel chunks
(`Engine.prefill`: the same state and records within fp32 rounding, tested): all of it with
adaptation off, where nothing in the test part depends on the order of steps, and only the history
before the test part with adaptation on, the test part then streaming through the engine as with
`path="engine"` so that the adapter learns from it; the report names the path.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from oryx_ts.datasets.labels import LabelWindow, TelemetryStream, windows_from_mask
from oryx_ts.evaluation.metrics import horizon_targets, score_forecasts, seasonal_scale
from oryx_ts.evaluation.peers import PEERS, PeerBudget, freq_string, make_peer

__all__ = ["BacktestSpec", "BacktestResult", "derive_labels", "fit_model", "load_stream", "run_backtest", "split_rows"]

Path_ = Literal["engine", "prefill"]
ROUTERS = ("none", "all", "fixed", "surprise", "learned")


@dataclass(frozen=True, kw_only=True)
class BacktestSpec:
    """What to backtest; every field has the CLI flag of the same name (`oryx-ts backtest --help`)."""

    dataset: str  # a packaged dataset name or a CSV/Parquet path
    out: str = "runs/backtest"
    timestamp: str | None = None
    channels: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None
    step: str | None = None
    duplicates: str = "error"
    cache: str | None = None
    aggregate: int = 1  # mean over blocks of this many raw steps (e.g. 60: minutes to hours)
    rows: int | None = None  # keep only the first rows (after aggregation)
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    horizon: int = 24
    model: str | None = None  # checkpoint directory; None trains one
    preset: str = "debug"
    univariate: bool = False  # train a 1-channel model on every column (each column a series of its own)
    overrides: tuple[str, ...] = ()
    train_steps: int | None = None
    max_minutes: float | None = None
    router: str = "surprise"  # none | all | fixed:K | surprise | learned
    budget: float = 0.1
    adaptation: bool = False
    peers: tuple[str, ...] = ("seasonal_naive",)
    peer_budget: PeerBudget = field(default_factory=PeerBudget)
    season: int | None = None
    warmup_tokens: int | None = None
    origin_stride: int = 1
    path: Path_ = "engine"
    retention: str | None = None  # all | bounded[:WINDOW[:PINNED]]: the model's KV-cache retention in the replay (None: its own)
    progress: bool = True

    def __post_init__(self) -> None:
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6 or self.split[0] <= 0 \
                or self.split[2] <= 0:
            raise ValueError(f"split must be three fractions train,validation,test summing to 1 (train, test > 0), got {self.split}")
        for name in ("horizon", "aggregate", "origin_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.router.split(":")[0] not in ROUTERS:
            raise ValueError(f"router must be one of none, all, fixed:K, surprise, learned; got {self.router!r}")
        if not 0 <= self.budget <= 1:
            raise ValueError(f"budget must be in [0, 1], got {self.budget}")
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise ValueError(f"unknown peers {unknown}; choose from {', '.join(PEERS)}")
        if self.path not in ("engine", "prefill"):
            raise ValueError(f"path must be engine or prefill, got {self.path!r}")
        if self.retention is not None:
            from oryx_ts.config import parse_retention

            parse_retention(self.retention)


@dataclass
class BacktestResult:
    """Everything the report shows; `summary` is what backtest.json holds."""

    summary: dict[str, Any]
    stream: TelemetryStream
    ends_N: np.ndarray
    target_NHzC: np.ndarray
    forecasts: dict[str, np.ndarray]  # model name -> (N, Hz, C, Q)
    windows: list[LabelWindow]
    tokens: dict[str, np.ndarray]  # per replayed test token: origin row, mode, flops, allowance, state bytes
    files: dict[str, str] = field(default_factory=dict)


def load_stream(spec: BacktestSpec) -> TelemetryStream:
    """The dataset: packaged by name, else read from the file; aggregated and cut as the spec says."""
    from oryx_ts.datasets import DATASETS, load, read

    if spec.dataset in DATASETS:
        stream = load(spec.dataset, spec.cache)
        if spec.channels:
            missing = [c for c in spec.channels if c not in stream.channels]
            if missing:
                raise ValueError(f"{spec.dataset} has no channels {missing}; it has {list(stream.channels)}")
            idx = [stream.channels.index(c) for c in spec.channels]
            stream = TelemetryStream(stream.values[:, idx], stream.labels, tuple(spec.channels), stream.start, stream.step,
                                     stream.name, stream.meta)
    else:
        if not Path(spec.dataset).exists():
            raise ValueError(f"{spec.dataset!r} is neither a packaged dataset ({', '.join(DATASETS)}) nor a file")
        stream = read(spec.dataset, timestamp=spec.timestamp, channels=list(spec.channels) if spec.channels else None,
                      labels=list(spec.labels) if spec.labels else None, step=spec.step, duplicates=spec.duplicates)
    if spec.aggregate > 1:
        stream = aggregate(stream, spec.aggregate)
    if spec.rows is not None:
        stream = stream.slice(0, min(spec.rows, len(stream)))
    return stream


def aggregate(stream: TelemetryStream, k: int) -> TelemetryStream:
    """Means over blocks of `k` steps (missing cells skipped; a block with none observed is missing); labels
    cover every block they touch; a trailing partial block is dropped."""
    L = len(stream) // k
    blocks = stream.values[: L * k].reshape(L, k, -1)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            values = np.nanmean(blocks, axis=1).astype(np.float32)
    labels = [LabelWindow(w.start // k, min(L, -(-w.end // k)), w.kind) for w in stream.labels if w.start // k < L]
    step = None if stream.step is None else stream.step * k
    return TelemetryStream(values, labels, stream.channels, stream.start, step, stream.name, stream.meta)


def split_rows(length: int, split: tuple[float, float, float]) -> tuple[int, int]:
    """(a, b): train rows `[0, a)`, validation `[a, b)`, test `[b, length)`."""
    a = int(round(length * split[0]))
    b = int(round(length * (split[0] + split[1])))
    return a, b


def season_of(stream: TelemetryStream, season: int | None, train_rows: int) -> int:
    """The seasonal period in steps: `season`, else a day of steps when the clock has one and the training
    part holds two of them, else 1 (naive)."""
    if season is not None:
        if season < 1:
            raise ValueError(f"season must be >= 1, got {season}")
        return season
    if stream.step is not None:
        seconds = int(stream.step / np.timedelta64(1, "s"))
        if seconds > 0 and 86400 % seconds == 0 and 2 * 86400 // seconds <= train_rows:
            return 86400 // seconds
    return 1


def derive_labels(values_LC: np.ndarray, train_rows: int, *, tail: float = 0.001) -> list[LabelWindow]:
    """Derived rare-regime windows for data without labels: `outage` where every channel is missing, and
    `extreme` where some channel lies outside its training part's [tail, 1 - tail] quantiles."""
    values = np.asarray(values_LC, np.float64)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(values[:train_rows], [tail, 1 - tail], axis=0)
    with np.errstate(invalid="ignore"):
        extreme = ((values < lo) | (values > hi)).any(axis=1)
    outage = np.isnan(values).all(axis=1)
    return windows_from_mask(outage, "outage") + windows_from_mask(extreme, "extreme")


def _routed(model, spec: BacktestSpec, train_values: np.ndarray, checkpoint: str | None):
    from oryx_ts.routers import AllRouter, BudgetConfig, FixedRouter, NoneRouter, RoutedForecaster, SurpriseRouter

    name, _, arg = spec.router.partition(":")
    budget = BudgetConfig(fraction=spec.budget)
    if name == "none":
        return RoutedForecaster(model, NoneRouter()), "all-recurrent"
    if name == "all":
        return RoutedForecaster(model, AllRouter()), "all-attention"
    if name == "fixed":
        every = int(arg or 4)
        return RoutedForecaster(model, FixedRouter(every)), f"fixed 1-in-{every} schedule"
    if name == "surprise":
        return RoutedForecaster(model, SurpriseRouter(), budget), f"surprise router, budget {spec.budget:g}"
    from oryx_ts.checkpoint import load_router
    from oryx_ts.train import train_router

    router = load_router(checkpoint) if checkpoint else None
    how = "from the checkpoint"
    if router is None:
        router = train_router(model, train_values, budget=budget, progress=spec.progress).router
        how = "trained on the training rows"
    return RoutedForecaster(model, router, budget), f"learned router ({how}), budget {spec.budget:g}"


def fit_model(spec: BacktestSpec, stream: TelemetryStream, a: int, b: int, out: Path) -> tuple[Any, dict]:
    """The oryx model of a backtest: `spec.model` loaded and checked against the data, else the preset (with
    the data's channels, the horizon and `spec.overrides`) trained on rows `[0, b)` with validation tail
    `[a, b)`, under `spec.max_minutes`; returns it and what the report says of it."""
    from oryx_ts.checkpoint import DataInfo, load
    from oryx_ts.config import parse_overrides, preset
    from oryx_ts.train import train

    C = stream.n_channels
    if spec.model:
        model = load(spec.model)
        c = model.config
        if c.tokenizer.channels not in (1, C):  # a 1-channel model forecasts each column as its own series
            raise ValueError(f"the model reads {c.tokenizer.channels} channels, the data has {C} ({', '.join(stream.channels)})")
        if c.head.horizon < spec.horizon:
            raise ValueError(f"the model forecasts {c.head.horizon} steps, --horizon asks for {spec.horizon}")
        return model, {"source": spec.model, "preset": None, "config": c.to_dict()}
    val_fraction = (b - a) / b if b > a else 0.05
    config = preset(spec.preset).replace(tokenizer={"channels": 1 if spec.univariate else C}, head={"horizon": spec.horizon},
                                         train={"val_fraction": val_fraction} | ({"steps": spec.train_steps} if spec.train_steps else {}))
    P = config.tokenizer.patch_len
    fits = max(1, min(config.train.window_tokens, (a - 1) // P))  # (a - 1): the split is int(b * (1 - val_fraction)), rounded
    if fits < config.train.window_tokens:  # a short training part: shorter training windows, said in the report
        config = config.replace(train={"window_tokens": fits})
    config = parse_overrides(config, list(spec.overrides))
    step = None if stream.step is None else int(stream.step / np.timedelta64(1, "s"))
    data = DataInfo(channels=tuple(stream.channels), univariate=spec.univariate, step_seconds=step, start=None if stream.start is None else str(stream.start))
    max_seconds = None if spec.max_minutes is None else 60 * spec.max_minutes
    result = train(config, stream.values[:b], out_dir=out / "model", progress=spec.progress, data=data, max_seconds=max_seconds)
    info = {"source": "trained here on rows [0, b)", "preset": spec.preset, "overrides": list(spec.overrides), "univariate": spec.univariate,
            "steps": result.steps, "seconds": round(result.seconds, 1), "val_loss_first": result.val_losses[0],
            "val_loss_last": result.val_losses[-1], "best_step": result.validation["best_step"],
            "best_val_loss": result.validation["best_val_loss"], "checkpoint": str(result.checkpoint), "config": config.to_dict()}
    return result.model, info


def _replay(routed, values_LC: np.ndarray, spec: BacktestSpec, windows: list[LabelWindow], s: int, b: int) -> tuple[dict, dict]:
    """Oryx over rows `[s, s + T P)`: per token served and frozen forecasts, modes, FLOPs, allowance, state bytes.

    A 1-channel model on wider data replays each column as a series of its own; per token the forecasts
    are then side by side, the mode is the share of columns in attention, and FLOPs, allowance and state
    bytes are summed."""
    from oryx_ts.evaluation.backtest import backtest_streams
    from oryx_ts.streams.adapter import AdapterConfig

    P = routed.config.tokenizer.patch_len
    T = (len(values_LC) - s) // P
    x = values_LC[s : s + T * P]
    # a 1-channel model forecasts each column as a series of its own, all in one engine (sharing its micro-batches)
    streams = {"stream": x} if routed.config.tokenizer.channels == x.shape[1] else {str(c): x[:, c : c + 1] for c in range(x.shape[1])}
    spans = [(max(0, w.start - s), w.end - s) for w in windows if w.end > s]
    labels = {sid: spans for sid in streams}
    adapter = AdapterConfig(enabled=spec.adaptation)
    info: dict[str, Any] = {"path": spec.path, "tokens": T, "first_row": s}
    began = time.perf_counter()
    history = 0
    if spec.path == "prefill":
        if routed.router.needs_surprise:
            raise ValueError("path=prefill needs a router that reads no surprise (none, all, fixed:K); use path=engine")
        history = max(0, b - s) if spec.adaptation else len(x)
        info["history_rows"] = history
    got = backtest_streams(routed, streams, adapter=adapter, labels=labels, progress=spec.progress, desc="oryx replay",
                           history=history)
    info["seconds"] = time.perf_counter() - began
    if len(got) == 1:
        one = got["stream"]
        info["audit"] = {k: v for k, v in one.audit.items() if k != "state_bytes_history"}
        run = {k: getattr(one, k) for k in ("forecasts_THzCQ", "frozen_THzCQ", "modes_T", "flops_T", "allowance_T", "state_bytes_T")}
        return run, info
    parts = [got[sid] for sid in streams]  # per token: forecasts side by side, the attention rate, FLOPs and state summed
    run = {"forecasts_THzCQ": np.concatenate([p.forecasts_THzCQ for p in parts], axis=2),
           "frozen_THzCQ": np.concatenate([p.frozen_THzCQ for p in parts], axis=2),
           "modes_T": np.mean([p.modes_T for p in parts], axis=0),
           **{k: np.sum([getattr(p, k) for p in parts], axis=0) for k in ("flops_T", "allowance_T", "state_bytes_T")}}
    info["series"] = len(parts)
    info["audit"] = {"per_series": {sid: {k: v for k, v in got[sid].audit.items() if k != "state_bytes_history"} for sid in streams}}
    gains = [got[sid].audit.get("adaptation_gain") for sid in streams]
    if all(g is not None for g in gains):
        info["audit"]["adaptation_gain"] = float(np.mean(gains))
    info["audit"]["adapter_rollbacks"] = int(sum(got[sid].audit.get("adapter_rollbacks", 0) for sid in streams))
    return run, info


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _mask_outside(target: np.ndarray, keep_NHz: np.ndarray) -> np.ndarray:
    out = target.copy()
    out[~keep_NHz] = np.nan
    return out


def score_all(forecasts: dict[str, np.ndarray], target: np.ndarray, ends: np.ndarray, windows: list[LabelWindow],
              quantiles: tuple[float, ...], scale_C: np.ndarray, channels: tuple[str, ...]) -> dict[str, Any]:
    """Per model: pooled and per-channel scores, inside and outside the windows (entries whose target row
    lies in a window), and MAE/CRPS by horizon step."""
    H = target.shape[1]
    rows = ends[:, None] + 1 + np.arange(H)[None, :]
    inside = np.zeros(rows.shape, dtype=bool)
    for w in windows:
        inside |= (rows >= w.start) & (rows < w.end)
    out = {}
    for name, f in forecasts.items():
        per = score_forecasts(f, target, quantiles, scale_C=scale_C, per_channel=True)
        entry = {
            "overall": score_forecasts(f, target, quantiles, scale_C=scale_C),
            "per_channel": {ch: {k: (v[c] if isinstance(v, np.ndarray) else v) for k, v in per.items()} for c, ch in enumerate(channels)},
            "inside_windows": score_forecasts(f, _mask_outside(target, inside), quantiles, scale_C=scale_C) if inside.any() else None,
            "outside_windows": score_forecasts(f, _mask_outside(target, ~inside), quantiles, scale_C=scale_C),
            "by_horizon": [score_forecasts(f[:, h : h + 1], target[:, h : h + 1], quantiles, scale_C=scale_C) for h in range(H)],
        }
        out[name] = entry
    return out


def run_backtest(spec: BacktestSpec) -> BacktestResult:
    """Run the whole job and write `report.md`, `backtest.json` and the PNGs under `spec.out`.

    Raises `ValueError` for data, a split or a model that cannot backtest (e.g. a test part shorter
    than one horizon, a checkpoint of another width).
    """
    from oryx_ts.evaluation.report import targets, write_report

    began = time.perf_counter()
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    stream = load_stream(spec)
    values = stream.values
    L, C = values.shape
    a, b = split_rows(L, spec.split)
    if L - b <= spec.horizon:
        raise ValueError(f"the test part [{b}, {L}) has {L - b} rows, fewer than a horizon of {spec.horizon} + 1")
    period = season_of(stream, spec.season, a)
    scale_C = seasonal_scale(values[:a], period)
    if spec.labels is None and stream.labels:
        windows, label_source = list(stream.labels), "dataset"
    elif stream.labels:
        windows, label_source = list(stream.labels), f"file columns {list(spec.labels)}"
    else:
        windows, label_source = derive_labels(values, a), "derived (outage: every channel missing; extreme: outside the training 0.1-99.9% quantiles)"

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, model_info = fit_model(spec, stream, a, b, out)
    if spec.retention is not None:  # a deployment setting: the same weights under another retention
        from oryx_ts.checkpoint import with_retention
        from oryx_ts.config import parse_retention

        model = with_retention(model, **parse_retention(spec.retention))
        model_info["retention"] = {k: getattr(model.config.block, k) for k in ("retention", "window", "pinned")}
    timings["oryx_train"] = time.perf_counter() - t0
    quantiles = tuple(model.config.head.quantiles)
    routed, router_desc = _routed(model, spec, values[:b], spec.model)
    P = model.config.tokenizer.patch_len
    s = b % P
    if spec.warmup_tokens is not None:
        s = max(s, b - spec.warmup_tokens * P)
    T = (L - s) // P
    ends_T = s + (np.arange(T) + 1) * P - 1
    scored = np.flatnonzero((ends_T >= b - 1) & (ends_T + spec.horizon <= L - 1))
    scored = scored[:: spec.origin_stride]
    if len(scored) == 0:
        raise ValueError(f"no test origin has a whole horizon of {spec.horizon} steps inside the test part [{b}, {L})")
    ends = ends_T[scored]
    target = horizon_targets(values, ends, spec.horizon)

    t0 = time.perf_counter()
    run, replay = _replay(routed, values, spec, windows, s, b)
    timings["oryx_replay"] = time.perf_counter() - t0
    forecasts = {"oryx": run["forecasts_THzCQ"][scored, : spec.horizon]}
    if spec.adaptation:
        forecasts["oryx_frozen"] = run["frozen_THzCQ"][scored, : spec.horizon]

    step_seconds = None if stream.step is None else int(stream.step / np.timedelta64(1, "s"))
    freq = freq_string(step_seconds)
    peers_info = {}
    for name in spec.peers:
        peer = make_peer(name, horizon=spec.horizon, quantiles=quantiles, period=period, budget=spec.peer_budget,
                         progress=spec.progress)
        t0 = time.perf_counter()
        if name == "seasonal_naive":
            peer.fit(values[:b], freq=freq, start=stream.start, horizon=spec.horizon)
        else:
            peer.fit(values[:b], freq=freq, start=stream.start)
        fit_s = time.perf_counter() - t0
        forecasts[name] = peer.predict(values, ends, spec.horizon)
        peers_info[name] = {**peer.info, "fit_seconds": round(fit_s, 1), "predict_seconds": round(time.perf_counter() - t0 - fit_s, 1)}
        timings[name] = time.perf_counter() - t0

    scores = score_all(forecasts, target, ends, windows, quantiles, scale_C, tuple(stream.channels))
    test_tok = ends_T >= b - 1
    tokens = {"origin_row": ends_T[test_tok], **{k: run[k][test_tok] for k in ("modes_T", "flops_T", "allowance_T", "state_bytes_T")}}
    naive = scores.get("seasonal_naive", {}).get("overall", {})
    ratios = {}
    for name in forecasts:
        o = scores[name]["overall"]
        ratios[name] = {k: (o[k] / naive[k] if naive.get(k) else None) for k in ("mase", "crps")}
    flops, allow = tokens["flops_T"].astype(np.float64), tokens["allowance_T"].astype(np.float64)
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "dataset": {"source": spec.dataset, "name": stream.name, "rows": L, "channels": list(stream.channels),
                    "step_seconds": step_seconds, "aggregate": spec.aggregate, "start": None if stream.start is None else str(stream.start)},
        "split": {"fractions": list(spec.split), "train": [0, a], "validation": [a, b], "test": [b, L]},
        "horizon": spec.horizon, "quantiles": list(quantiles), "season": period,
        "mase_scale": {"period": period, "rows": [0, a], "per_channel": dict(zip(stream.channels, scale_C.tolist()))},
        "origins": {"count": int(len(ends)), "first": int(ends[0]), "last": int(ends[-1]), "stride_tokens": spec.origin_stride,
                    "patch_len": P, "replay_first_row": int(s), "warmup_tokens": int((b - s) // P)},
        "labels": {"source": label_source, "windows": len(windows),
                   "kinds": sorted({w.kind for w in windows}),
                   "test_rows_inside": int(sum(max(0, min(w.end, L) - max(w.start, b)) for w in windows))},
        "oryx": {"model": model_info, "router": router_desc, "budget": spec.budget, "adaptation": spec.adaptation,
                 "replay": replay,
                 "attention_rate_test": float(tokens["modes_T"].mean()) if len(tokens["modes_T"]) else None,
                 "realized_over_allowance_test": float(flops.sum() / allow.sum()) if np.isfinite(allow).all() and allow.sum() else None},
        "peers": peers_info,
        "scores": scores,
        "vs_seasonal_naive": ratios,
        "seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.perf_counter() - began, 1)},
        "spec": {k: v for k, v in asdict(spec).items()},
    }
    summary["targets"] = targets(scores)
    result = BacktestResult(summary=summary, stream=stream, ends_N=ends, target_NHzC=target, forecasts=forecasts,
                            windows=windows, tokens=tokens)
    result.files = write_report(result, out)
    summary["seconds"]["total"] = round(time.perf_counter() - began, 1)
    (out / "backtest.json").write_text(json.dumps(_jsonable(summary), indent=2))
    result.files["json"] = str(out / "backtest.json")
    return result
