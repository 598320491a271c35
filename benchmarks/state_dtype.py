"""Accuracy effect of a bf16 / fp16 streaming state against fp32: error change and drift over a long stream.

    python benchmarks/state_dtype.py [--checkpoint DIR] [--steps 100000] [--series 16] [--threads N] [--out FILE]

Streams `--series` windows of one synthetic stream (`datasets.synthetic.generate`, offset from each
other) through the model for `--steps` patches, with the state in fp32, bf16 and fp16 side by side
(`evaluation.state_precision.compare_state_dtypes`; CUDA graphs on a GPU). A checkpoint is loaded
with bounded retention (window 128 + 16 pinned) so the state stays fixed in size; without one a
random debug-preset model is used. Prints MAE and quantile loss per dtype over the whole stream and
the first and last windows, and the drift from the fp32 forecasts per window.
"""

import argparse
import json
import time

import torch

from oryx_ts import checkpoint
from oryx_ts.config import preset
from oryx_ts.datasets.synthetic import generate
from oryx_ts.evaluation.state_precision import compare_state_dtypes
from oryx_ts.model import OryxForecaster


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--series", type=int, default=16)
    ap.add_argument("--window", type=int, default=10_000)
    ap.add_argument("--attention", type=float, default=0.1, help="share of tokens stepped in attention mode (random)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest for small CPU steps)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.checkpoint:
        model = checkpoint.load(args.checkpoint, retention="bounded", window=128, pinned=16)
    else:
        torch.manual_seed(0)
        model = OryxForecaster(preset("debug", block={"retention": "bounded", "window": 128, "pinned": 16}))
    model = model.to(dev).eval()
    P, C = model.config.tokenizer.patch_len, model.config.tokenizer.channels
    L = (args.steps + 1) * P
    offset = 5_000 * P
    values = torch.from_numpy(generate(L + offset * (args.series - 1), C, seed=7, progress=False).values)
    x_BLC = torch.stack([values[b * offset : b * offset + L] for b in range(args.series)]).to(dev)
    gen = torch.Generator().manual_seed(8)
    modes = (torch.rand(args.series, args.steps + 1, generator=gen) < args.attention).float().to(dev)
    t0 = time.time()
    res = compare_state_dtypes(model, x_BLC, window=args.window, modes_BT=modes, progress=True)
    res.update(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", seconds=round(time.time() - t0, 1),
               checkpoint=args.checkpoint, attention=args.attention)
    print(f"{args.series} series x {res['steps']} steps on {res['device']} in {res['seconds']} s, "
          f"{args.attention:.0%} of tokens in attention mode")
    print(f"{'state':<10} {'MAE':>9} {'q-loss':>9} {'MAE first/last window':>24} {'drift first / last / max':>28}")
    w = torch.tensor(res["step"], dtype=torch.float64).diff(prepend=torch.zeros(1, dtype=torch.float64))
    for name in ("fp32", "bfloat16", "float16"):
        r = res[name]
        mae = float((torch.tensor(r["mae"]) * w).sum() / w.sum())
        ql = float((torch.tensor(r["quantile_loss"]) * w).sum() / w.sum())
        r["mae_all"], r["quantile_loss_all"] = mae, ql
        d = r.get("drift")
        dd = f"{d[0]:.2e} / {d[-1]:.2e} / {max(d):.2e}" if d else "-"
        print(f"{name:<10} {mae:9.5f} {ql:9.5f} {r['mae'][0]:11.5f} / {r['mae'][-1]:.5f} {dd:>28}")
    for name in ("bfloat16", "float16"):
        print(f"{name} vs fp32: MAE {res[name]['mae_all'] / res['fp32']['mae_all'] - 1:+.3%}, "
              f"quantile loss {res[name]['quantile_loss_all'] / res['fp32']['quantile_loss_all'] - 1:+.3%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
