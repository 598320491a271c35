"""How far attention itself lowers the error inside event windows: the ceiling of any router.

A router lowers the forecast error inside event windows only as far as attention mode lowers it
there. For each forecaster variant below, this trains the `debug` forecaster on the training
stream of a routing scenario (`oryx_ts.datasets.scenarios`, as `routing.py --stream`) for 3,000
steps on 524,288 steps of telemetry (ten times the anomaly benchmark's training), and reports on fresh
evaluation streams (seeds 1, 3 and 4, each 4 segments of 1,280 tokens) the MAE of forecasts made
inside event windows with
- every token recurrent (`rec`),
- every token in attention (`att`),
- attention on exactly the event tokens, with no budget (`oracle`): what a perfect router could
  reach with any budget.
Variants run as parallel processes (`--jobs`, each with an equal share of the CPU threads).
Writes `results.json` and `ceiling.png`.

    python benchmarks/attention_ceiling.py [--stream anomalies|programs|daily] [--out runs/ceiling] [--jobs 1] [--quick]
"""

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from oryx_ts.datasets.scenarios import EVALUATION_SEED, FRESH_SEEDS, SCENARIOS
from oryx_ts.evaluation.routing import attention_ceiling
from oryx_ts.routers.training import RECIPES
from oryx_ts.train import train

# name: (changes to the block, changes to the training), on top of the scenario's recipe
# (`oryx_ts.routers.training.RECIPES`; none for `anomalies`); all train 3,000 steps unless they say otherwise
VARIANTS = {
    "as the stream, 25% attention chunks": ({}, {"attention_fraction": 0.25}),
    "as the stream, 50% attention chunks": ({}, {"attention_fraction": 0.5}),
    "16 key dims, RoPE base 100, 50%": ({"head_dim_k": 16, "rope_base": 100.0}, {"attention_fraction": 0.5}),
    "16 key dims, RoPE base 100, 25%": ({"head_dim_k": 16, "rope_base": 100.0}, {"attention_fraction": 0.25}),
    "mamba2 mixer, 50%": ({"mixer": "mamba2"}, {"attention_fraction": 0.5}),
    "16 key dims, 50%": ({"head_dim_k": 16}, {"attention_fraction": 0.5}),
    "3 layers, 50%, 2,000 steps": ({"n_layers": 3}, {"attention_fraction": 0.5, "steps": 2000}),
    "no RoPE, 50%": ({"rope": False}, {"attention_fraction": 0.5}),
}
STEPS = 3000
TRAIN_LENGTH = 1 << 19
SEEDS = (EVALUATION_SEED, *FRESH_SEEDS[:2])


def run_variant(name: str, stream: str, quick: bool, threads: int) -> dict:
    """Train one variant and measure its MAE inside event windows on every evaluation seed."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    started = time.time()
    scenario, recipe = SCENARIOS[stream], RECIPES[stream]
    block, training = VARIANTS[name]
    config = recipe.config(block=block, train={"steps": STEPS, **training})
    if quick:
        config = config.replace(train={"steps": 20, "window_tokens": 32})
    train_values, _ = scenario.train_stream(config.tokenizer.channels, length=6000 if quick else TRAIN_LENGTH)
    model = train(config, train_values, progress=False).model
    seg_tokens, n_seg = (160, 2) if quick else (1280, 4)
    # seed 3's short stream holds event windows of every stream kind
    per_seed = {seed: attention_ceiling(model, scenario, seed, seg_tokens, n_seg) for seed in (FRESH_SEEDS[:1] if quick else SEEDS)}
    return {"variant": name, "block": block, "train": training, "mae_in": per_seed, "seconds": time.time() - started}


def relative(result: dict, mode: str) -> float:
    """Mean over the seeds of MAE(mode) / MAE(all-recurrent) - 1 inside event windows (negative: attention helps)."""
    return float(np.mean([s[mode] / s["rec"] - 1 for s in result["mae_in"].values()]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream", choices=sorted(SCENARIOS), default="anomalies")
    ap.add_argument("--out", default="runs/ceiling")
    ap.add_argument("--jobs", type=int, default=1, help="variants trained at once, in separate processes")
    ap.add_argument("--quick", action="store_true", help="two variants, much smaller, for smoke tests")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(VARIANTS)[:2] if args.quick else list(VARIANTS)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: torch's threads are not fork-safe
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = [pool.submit(run_variant, name, args.stream, args.quick, threads) for name in names]
        results = [f.result() for f in tqdm(as_completed(futures), total=len(futures), desc="variants")]
    results.sort(key=lambda r: names.index(r["variant"]))

    seeds = list(results[0]["mae_in"])
    print(f"\nMAE inside event windows ({args.stream} stream): all-recurrent / all-attention / attention on event tokens only")
    print("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | all-attention vs all-recurrent | oracle vs all-recurrent |")
    print("|---|" + "---|" * (len(seeds) + 2))
    for r in results:
        cells = " | ".join("{rec:.3f} / {att:.3f} / {oracle:.3f}".format(**r["mae_in"][s]) for s in seeds)
        print(f"| {r['variant']} | {cells} | {relative(r, 'att'):+.1%} | {relative(r, 'oracle'):+.1%} |")
    (out / "results.json").write_text(json.dumps({"stream": args.stream, "variants": results, "seconds": time.time() - started}, indent=2))
    plot(out / "ceiling.png", results, args.stream)
    print(f"\nwrote {out / 'results.json'}, {out / 'ceiling.png'} ({time.time() - started:.0f}s)")


def plot(path: Path, results: list[dict], stream: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.5 * len(results) + 1.8))
    y = np.arange(len(results))
    ax.barh(y - 0.2, [100 * relative(r, "att") for r in results], height=0.4, label="all-attention")
    ax.barh(y + 0.2, [100 * relative(r, "oracle") for r in results], height=0.4, label="attention on event tokens only")
    ax.axvline(-15, color="tab:red", ls="--", lw=1, label="15% below all-recurrent")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [r["variant"] for r in results], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="MAE inside event windows vs all-recurrent (%, mean over seeds; negative: attention helps)",
           title=f"What attention itself gains inside event windows ({stream} stream)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
