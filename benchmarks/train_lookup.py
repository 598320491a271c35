"""Train the look-up forecaster of a routing scenario (`routers.training.LOOKUP_RECIPES`) and measure its look-up.

A recipe names a scenario (`programs`, `daily`; a suffix after `-` names a variant) and how its
larger forecaster trains: a recall curriculum among distractors, then the scenario's telemetry
with curriculum blocks mixed in, under a time budget (`--seconds`, default the recipe's) on
`--device`. Before the budget starts, a few steps on the device compile its kernels, so the
budget's probe times steady steps. Then, on the same device, per evaluation seed (4 segments of 1,280
tokens, as `benchmarks/routing.py` scores them): MAE inside repeats all-recurrent, all-attention
and of an exact copy of the earlier play, and the share of the copy's gain that attention
recovers (`evaluation.routing.lookup`); MAE inside event windows all-recurrent, all-attention and
with attention on the event tokens only (`evaluation.routing.attention_ceiling`). Seed 2 (the
scenarios' validation seed) is the one variants are chosen on; seed 1 is the routing benchmark's
evaluation stream; the others are fresh. Between the phases the look-up on the first two seeds and, as at the
end, on held-out curriculum streams (`datasets.recall.RecallScenario`, seeds `RECALL_SEEDS`, 4 segments of 256 tokens): plays of 128
steps back to back and after 0-384 steps of distractors (`RECALL_EVAL`), which tells a look-up that
never formed from one that formed but does not carry over to the scenario.

Writes `<out>/<recipe>/model/` (safetensors + JSON config; its `extra` holds the recipe, the steps
each phase ran and the figures) and `<out>/<recipe>/lookup.json`. `--steps R,T` repeats a run by
its step counts (no time budget): the counts are in the checkpoint's `extra.record`.

    python benchmarks/train_lookup.py --recipe programs --device cuda --out runs/lookup [--seconds 240] [--steps R,T] [--quick]
    python benchmarks/train_lookup.py --recipe programs --device cpu --threads 1 --steps 600,2000 --out runs/lookup   # on the CPU, by step counts
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import oryx_ts
from oryx_ts.datasets.recall import RecallScenario
from oryx_ts.datasets.scenarios import SCENARIOS
from oryx_ts.evaluation.routing import attention_ceiling, lookup
from oryx_ts.routers.training import LOOKUP_RECIPES
from oryx_ts.train import train

EVAL_SEEDS = (2, 1, 3, 4, 5, 6, 7)  # 2: chosen on; 1: the routing benchmark's evaluation stream; the rest fresh
# the look-up on the curriculum itself: held-out `recall_stream`s (the curriculum trains on seeds 5 and 6)
RECALL_EVAL = {"back-to-back": {"period": 128, "repeats": 4}, "gaps": {"period": 128, "repeats": 4, "max_gap": 384}}
RECALL_SEEDS = (11, 12)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", choices=sorted(LOOKUP_RECIPES), default="programs")
    ap.add_argument("--out", default="runs/lookup")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, help="time budget of the training (default: the recipe's)")
    ap.add_argument("--steps", type=ints, help="R,T: run exactly R curriculum and T telemetry steps, no time budget")
    ap.add_argument("--seeds", type=ints, default=EVAL_SEEDS, help="evaluation seeds")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="a much smaller run, for smoke tests")
    ap.add_argument("--barrier", help="DIR:N: after the warm-up, wait until N runs have finished theirs (runs side by side on one GPU), "
                                      "so that no budget's probe times steps while another run compiles")
    args = ap.parse_args()
    started = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    recipe = LOOKUP_RECIPES[args.recipe]
    scenario_name = args.recipe.split("-")[0]
    scenario = SCENARIOS[scenario_name]
    config = recipe.config()
    seconds = args.seconds if args.seconds is not None else recipe.seconds
    if args.steps:
        recipe = dataclasses.replace(recipe, recall_steps=args.steps[0] if recipe.recall_steps else 0)
        config = config.replace(train={"steps": args.steps[-1]})
        seconds = None
    seg_tokens, n_seg = (160, 2) if args.quick else (1280, 4)
    if args.quick:
        config = config.replace(train={"window_tokens": 32, "val_every": 10, "batch_size": 4})
        seconds = min(seconds or 20.0, 20.0)
    out = Path(args.out) / args.recipe
    out.mkdir(parents=True, exist_ok=True)
    C = config.tokenizer.channels
    values, _ = scenario.train_stream(C, length=40_000 if args.quick else None)
    print(f"{args.recipe}: training stream {values.shape} ({time.time() - started:.0f}s); device {args.device}; budget {seconds} s")

    # compile the device's kernels (all-attention and mixed windows, validation) before the budget's probe times steps
    for warm in ({"attention_fraction": 1.0, "full_mode_fraction": 0.0}, {}):
        train(config.replace(train={**warm, "steps": 3, "val_every": 3}), values[:200_000], device=args.device, progress=False)
    print(f"warm-up done ({time.time() - started:.0f}s)")
    if args.barrier:
        wait_for_others(args.barrier, args.recipe)
        print(f"every run warmed up ({time.time() - started:.0f}s)")
    def check(m):  # the look-up before the telemetry can unlearn it: on the curriculum, and on the scenario's first two seeds
        with torch.no_grad():
            shares = {f"{r['stream']}-{r['seed']}": round(r["share"], 4) for r in recall_lookup(m.eval(), (64, 2) if args.quick else (256, 2))}
            for seed in args.seeds[:2]:
                shares[f"{scenario_name}-{seed}"] = round(lookup(m, scenario, seed, seg_tokens, n_seg)["share"], 4)
                print(f"after the curriculum, {scenario_name} seed {seed}: share {shares[f'{scenario_name}-{seed}']:.1%}")
        return shares

    plays = scenario.train_plays(C, length=len(values)) if recipe.telemetry_guide > 0 else None
    model, record = recipe.fit(values, config=config, seconds=seconds, device=args.device, progress=False,
                               check=check if recipe.recall_steps else None, train_plays=plays)
    print(f"trained: {json.dumps(record)} ({time.time() - started:.0f}s)")
    model = model.eval()  # scored where it trained (the forecasts come back to the host)

    rows = []
    for seed in args.seeds:
        with torch.no_grad():
            row = {"seed": seed, "repeats": lookup(model, scenario, seed, seg_tokens, n_seg),
                   "events": attention_ceiling(model, scenario, seed, seg_tokens, n_seg)}
        rows.append(row)
        r, e = row["repeats"], row["events"]
        print(f"seed {seed}: repeats rec {r['rec']:.3f} att {r['att']:.3f} copy {r['copy']:.3f} share {r['share']:.1%} "
              f"({r['repeats']} repeats, {r['tokens']} tokens); events rec {e['rec']:.3f} att {e['att']:.3f} oracle {e['oracle']:.3f}")
    recall_rows = recall_lookup(model, (64, 2) if args.quick else (256, 4))
    result = {"recipe": args.recipe, "scenario": scenario_name, "recipe_settings": dataclasses.asdict(recipe),
              "config": model.config.to_dict(), "record": record, "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "seconds_budget": seconds, "rows": rows, "recall": recall_rows,
              "seconds": round(time.time() - started, 1)}
    oryx_ts.save(model, out / "model", extra={k: result[k] for k in ("recipe", "scenario", "recipe_settings", "record", "device_name",
                                                                    "torch", "rows", "recall")})
    (out / "lookup.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'model'} and {out / 'lookup.json'} ({time.time() - started:.0f}s)")


def recall_lookup(model, segments: tuple[int, int]) -> list[dict]:
    """The look-up on held-out curriculum streams: per `RECALL_EVAL` setting and `RECALL_SEEDS` seed, `lookup`'s figures."""
    rows = []
    for name, settings in RECALL_EVAL.items():
        for seed in RECALL_SEEDS:
            with torch.no_grad():
                r = lookup(model, RecallScenario(settings), seed, *segments)
            rows.append({"stream": name, "seed": seed, **r})
            print(f"recall_stream {name}, seed {seed}: rec {r['rec']:.3f} att {r['att']:.3f} copy {r['copy']:.3f} share {r['share']:.1%} "
                  f"({r['repeats']} repeats, {r['tokens']} tokens)")
    return rows


def wait_for_others(barrier: str, name: str, timeout: float = 300.0) -> None:
    """Mark this run warmed up in the folder of `barrier` (`DIR:N`) and wait until N runs have (at most `timeout` s)."""
    folder, n = barrier.rsplit(":", 1)
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{name}.ready").touch()
    until = time.time() + timeout
    while len(list(Path(folder).glob("*.ready"))) < int(n) and time.time() < until:
        time.sleep(0.5)


if __name__ == "__main__":
    main()
