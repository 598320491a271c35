"""`oryx-ts demo`: the main job end to end on an embedded default.

Generates a multivariate telemetry stream with daily and weekly seasonality, noise and labelled
anomaly windows; trains the `debug` preset on it; streams the held-out tail patch by patch through
the streaming engine (`evaluation.backtest.stream_forecasts`, the service's code path) with a fixed
1-in-4 attention schedule and bounded retention; prints MAE and CRPS next to seasonal naive,
all-recurrent and all-attention; saves a plot of the forecasts with the attention tokens marked.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oryx_ts.config import preset
from oryx_ts.evaluation.backtest import stream_forecasts
from oryx_ts.evaluation.metrics import crps_quantiles, horizon_targets, mae, seasonal_naive
from oryx_ts.train import fixed_schedule, rows_needed, train

DAY = 96  # steps per day (15-minute telemetry)


@dataclass(frozen=True)
class DemoStream:
    values: np.ndarray  # (L, C) float32, NaN = missing
    anomalies: list[tuple[int, int]]  # [start, end) windows


def demo_stream(length: int = 24_000, channels: int = 4, *, seed: int = 0, n_anomalies: int = 12) -> DemoStream:
    """Seasonal telemetry with correlated channels, heteroscedastic noise, missing values and anomaly windows."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    daily = np.sin(2 * np.pi * t / DAY)[:, None] * rng.uniform(0.5, 1.5, channels)
    weekly = np.sin(2 * np.pi * t / (7 * DAY))[:, None] * rng.uniform(0.2, 0.6, channels)
    level = rng.uniform(-2, 2, channels) + np.cumsum(rng.normal(0, 0.002, (length, channels)), axis=0)
    noise = rng.normal(0, 1, (length, channels)) * (0.15 + 0.1 * (1 + np.sin(2 * np.pi * t / DAY))[:, None] / 2)
    common = rng.normal(0, 0.1, length)[:, None]
    values = (level + daily + weekly + noise + common) * rng.uniform(1, 20, channels)
    anomalies = []
    for start in np.sort(rng.choice(length - 200, n_anomalies, replace=False)):
        width = int(rng.integers(16, 64))
        chans = rng.random(channels) < 0.6
        values[start : start + width, chans] += rng.choice([-1, 1]) * rng.uniform(3, 6) * values[:, chans].std(0)
        anomalies.append((int(start), int(start + width)))
    gaps = rng.random(length) < 0.002
    values[gaps, rng.integers(channels)] = np.nan
    return DemoStream(values.astype(np.float32), anomalies)


def _scores(forecasts_TQ: np.ndarray, values: np.ndarray, ends: np.ndarray, quantiles: np.ndarray, mid: int) -> tuple[float, float]:
    target = horizon_targets(values, ends, forecasts_TQ.shape[1])
    return mae(forecasts_TQ[..., mid], target), crps_quantiles(forecasts_TQ, target, quantiles)


def run_demo(out_dir: str | Path = "runs/demo", *, steps: int | None = None, length: int = 24_000, progress: bool = True) -> dict[str, tuple[float, float]]:
    """Run the demo; returns `{method: (MAE, CRPS)}` and writes `model/`, `forecast.png` under `out_dir`."""
    started = time.time()
    out_dir = Path(out_dir)
    # bounded retention: attention sees the last training window of tokens (128, fewer when a short
    # stream holds no such window in its validation split) plus 16 pinned attention tokens, so
    # memory stays constant however long the stream runs
    config = preset("debug")
    if steps is not None:
        config = config.replace(train={"steps": steps})
    window = config.train.window_tokens
    while window > 1 and rows_needed(config.replace(train={"window_tokens": window})) > length:
        window -= 1
    config = config.replace(block={"retention": "bounded", "window": window, "pinned": 16}, train={"window_tokens": window})
    stream = demo_stream(length, config.tokenizer.channels)
    print(f"stream: {length} steps x {config.tokenizer.channels} channels, {len(stream.anomalies)} anomaly windows")

    result = train(config, stream.values, out_dir=out_dir / "model", progress=progress)
    vals = result.val_losses
    print(f"trained {config.train.steps} steps: validation loss {vals[0]:.4f} -> {vals[-1]:.4f} ({time.time() - started:.0f}s)")

    model = result.model
    P, Hz = config.tokenizer.patch_len, config.head.horizon
    quantiles = np.asarray(config.head.quantiles)
    mid = config.head.median_index
    split = int(length * (1 - config.train.val_fraction)) // P * P
    tail = stream.values[split : length // P * P]
    T = tail.shape[0] // P
    warmup = 16  # tokens streamed before scoring starts, so the normalization has settled
    ends = np.arange(T) * P + P - 1  # last observed step of each origin, within the tail
    scored = slice(warmup, T)

    schedules = {"oryx 1-in-4": fixed_schedule(T), "all-recurrent": np.zeros(T), "all-attention": np.ones(T)}
    table, forecasts = {}, {}
    for name, modes in schedules.items():
        forecasts[name] = stream_forecasts(model, tail, modes, progress=progress, desc=name)
        table[name] = _scores(forecasts[name][scored], tail, ends[scored], quantiles, mid)
    naive = seasonal_naive(tail, ends[scored], Hz, DAY)
    target = horizon_targets(tail, ends[scored], Hz)
    table["seasonal naive"] = (mae(naive, target), float("nan"))

    print(f"\nheld-out tail: {T - warmup} forecast origins x {Hz} steps x {config.tokenizer.channels} channels")
    print(f"{'method':<16}{'MAE':>10}{'CRPS':>10}")
    for name, (m, c) in table.items():
        print(f"{name:<16}{m:>10.3f}{c:>10.3f}" if not np.isnan(c) else f"{name:<16}{m:>10.3f}{'-':>10}")
    png = plot_forecasts(out_dir / "forecast.png", tail, forecasts["oryx 1-in-4"], schedules["oryx 1-in-4"], split, stream.anomalies, P, mid)
    print(f"\nplot: {png}\ncheckpoint: {out_dir / 'model'}\ntotal {time.time() - started:.0f}s")
    return table


def plot_forecasts(path: Path, tail: np.ndarray, forecasts: np.ndarray, modes, offset: int, anomalies, P: int, mid: int, channel: int = 0) -> Path:
    """Next-patch forecasts (median and outer quantiles) over the tail, attention tokens and anomalies marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = forecasts.shape[0]
    span = slice(max(0, T - 96), T - 1)  # the last 96 origins; each origin's next patch
    steps = np.concatenate([np.arange((n + 1) * P, (n + 2) * P) for n in range(span.start, span.stop)])
    next_patch = forecasts[span, :P, channel]  # (N, P, Q)
    fig, ax = plt.subplots(figsize=(13, 4.5))
    ax.plot(steps + offset, tail[steps, channel], color="black", lw=1, label="observed")
    ax.plot(steps + offset, next_patch[..., mid].reshape(-1), color="tab:blue", lw=1, label="median forecast")
    ax.fill_between(steps + offset, next_patch[..., 0].reshape(-1), next_patch[..., -1].reshape(-1), color="tab:blue", alpha=0.2, label="outer quantiles")
    for n in range(span.start, span.stop):
        if modes[n] > 0:
            ax.axvline(offset + n * P + P - 1, color="tab:red", alpha=0.35, lw=0.8)
    for a, b in anomalies:
        if offset + steps[0] <= b and a <= offset + steps[-1]:
            ax.axvspan(a, b, color="orange", alpha=0.2)
    ax.plot([], [], color="tab:red", alpha=0.5, label="attention token")
    ax.set_xlabel("step")
    ax.set_title(f"channel {channel}: next-patch forecasts, 1-in-4 attention schedule")
    ax.legend(loc="upper left", fontsize=8, ncol=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
