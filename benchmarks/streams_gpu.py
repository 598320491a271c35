"""The streams engine on a GPU: flush of many series against a bare batched `model.step` on the same device.

    python benchmarks/streams_gpu.py [--series 1024,16384] [--rounds 20]

Prints one row per size (flush and bare step in ms, series-patches per second, their ratio) and
checks that the engine on the GPU serves what it serves on the CPU for a few series (max |diff|).
"""

import argparse
import json
import time

import numpy as np
import torch

import oryx_ts
from oryx_ts.streams import AdapterConfig, Engine


def build(device: str, seed: int = 0) -> oryx_ts.OryxForecaster:
    torch.manual_seed(seed)
    model = oryx_ts.OryxForecaster(oryx_ts.preset("debug", block={"retention": "bounded", "window": 128, "pinned": 16}))
    with torch.no_grad():
        model.head.proj.weight.normal_(0, 0.2)
        model.head.proj.bias.normal_(0, 0.2)
    return model.eval().to(device)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--series", default="1024,16384")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for B in (int(b) for b in args.series.split(",")):
        for adapt in (False, True):
            model = build(device)
            engine = Engine(model, adapter=AdapterConfig(enabled=adapt))
            ids = [f"s{i}" for i in range(B)]
            for sid in ids:
                engine.add_series(sid, step=1, origin=0)
            rng = np.random.default_rng(0)
            state, patch = model.init_state(B), torch.randn(B, 8, 4, device=device)
            fl, br = [], []
            for r in range(args.rounds + 3):
                values = rng.standard_normal((B, 8, 4), dtype=np.float32)
                for i in rng.permutation(B):
                    engine.ingest(ids[i], np.arange(8 * r, 8 * r + 8), values[i])
                sync()
                t0 = time.perf_counter()
                engine.flush()
                sync()
                t1 = time.perf_counter()
                model.step(patch, state, None)
                sync()
                t2 = time.perf_counter()
                if r >= 3:
                    fl.append(t1 - t0)
                    br.append(t2 - t1)
            f, b = float(np.median(fl)), float(np.median(br))
            rows.append({"series": B, "adapter": adapt, "flush_ms": f * 1e3, "bare_step_ms": b * 1e3,
                         "flush_rate": B / f, "bare_rate": B / b, "flush_over_bare": f / b})
            print(f"{B:>6} series, adapter {'on ' if adapt else 'off'}: flush {f * 1e3:7.2f} ms ({B / f:>9,.0f}/s), "
                  f"bare step {b * 1e3:7.2f} ms ({B / b:>9,.0f}/s), ratio {f / b:.2f}x")
    # the same few series on the CPU and on this device: the engine serves the same forecasts
    served = {}
    for dev in sorted({"cpu", device}):
        engine = Engine(build(dev), adapter=AdapterConfig())
        x = np.random.default_rng(1).standard_normal((4, 30 * 8, 4), dtype=np.float32)
        for i in range(4):
            engine.add_series(f"s{i}", step=1, origin=0)
            engine.ingest(f"s{i}", np.arange(30 * 8), x[i])
        engine.flush()
        served[dev] = np.stack([engine.forecast(f"s{i}").values for i in range(4)])
    diff = float(np.abs(served[device] - served["cpu"]).max())
    print(f"engine on {device} vs cpu, 4 series x 30 patches, adaptation on: max |diff| {diff:.2e}")
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "rows": rows, "cpu_vs_device_max_abs_diff": diff}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
