"""Training speed: training tokens per second of `oryx_ts.train.fit` on a synthetic stream.

Each configuration builds a preset (`debug`, `small`; a mixer with `--mixer`), generates a
synthetic stream long enough for it (`oryx_ts.datasets.synthetic.generate`), and runs the
library's training loop `fit` for `--warmup + --steps` optimizer steps (the learning-rate
schedule of the preset's full `train.steps`, so nothing but the step count is changed).

Definition: a training token is one patch of one window processed by an optimizer step (forward,
backward, gradient clipping, AdamW), so a step processes `train.batch_size x train.window_tokens`
tokens. tokens/s = tokens per step x timed steps / their wall time. The first `--warmup` steps
(allocator warm-up, `torch.compile`'s first traces) are not timed, and neither is a step that ran
a validation pass (every `train.val_every` steps) nor the validation before the first step.
Step times are wall-clock intervals between `fit`'s per-step callbacks; the median step time is
printed too, since other processes on a shared machine make the mean noisy, and so are tokens
per CPU-second (the process's CPU time over the same steps, all threads): on a machine shared
with other work it moves far less with the load than wall time does.

`--compile` hands `fit` `torch.compile` as its loss wrapper (`wrap`), the hook DDP uses; `on`
compiles the model's loss, `off` runs eagerly. Several values of an option (comma-separated) give
one markdown table row per combination. `--set section.key=value` changes the preset (e.g. a
larger `train.batch_size`); such a row is another configuration, not the preset's speed.

    python benchmarks/train_speed.py [--preset debug,small] [--steps 20] [--warmup 3]
                                     [--threads 2] [--compile off,on] [--mixer gdn] [--set train.batch_size=32]
"""

import argparse
import itertools
import statistics
import subprocess
import time
from pathlib import Path

import torch

import oryx_ts
from oryx_ts.config import parse_overrides, preset
from oryx_ts.datasets.synthetic import generate
from oryx_ts.train import fit, rows_needed

ROOT = Path(oryx_ts.__file__).resolve().parents[1]


def code_version() -> str:
    """The short commit of the oryx_ts being measured, `+` when its working tree has changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "oryx_ts"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return sha + ("+" if dirty else "")


def measure(name: str, mixer: str, steps: int, warmup: int, threads: int, compiled: bool, overrides: list[str],
            device: str = "cpu") -> dict:
    """Train `warmup + steps` steps of preset `name`; returns the timing of the last `steps`."""
    if warmup < 1:
        raise ValueError("warmup must be >= 1: a step's interval starts at the callback of the step before it")
    torch.set_num_threads(threads)
    config = parse_overrides(preset(name, block={"mixer": mixer}), overrides)
    t = config.train
    if warmup + steps >= t.steps:
        raise ValueError(f"--warmup + --steps must stay below the preset's train.steps={t.steps}")
    stream = generate(max(4 * rows_needed(config), 20_000), config.tokenizer.channels, seed=0, progress=False)
    stamps: list[tuple[float, float, bool]] = []

    def on_step(state, record) -> None:
        stamps.append((time.perf_counter(), time.process_time(), "val_loss" in record))

    began = time.perf_counter()
    fit(config, stream.values, device=device, on_step=on_step, stop_after=warmup + steps,
        wrap=torch.compile if compiled else None)
    total = time.perf_counter() - began
    pairs = [(a, b) for a, b in zip(stamps[warmup - 1 :], stamps[warmup:]) if not b[2]]
    times = [b[0] - a[0] for a, b in pairs]
    cpu = sum(b[1] - a[1] for a, b in pairs)
    tokens = t.batch_size * t.window_tokens
    return {
        "preset": " ".join([name, *overrides]), "mixer": mixer, "threads": threads, "compile": "on" if compiled else "off",
        "batch": f"{t.batch_size} x {t.window_tokens}", "tokens_per_step": tokens, "timed_steps": len(times),
        "median_step_s": statistics.median(times), "tokens_per_s": tokens * len(times) / sum(times),
        "tokens_per_cpu_s": tokens * len(times) / cpu,
        "first_steps_s": stamps[warmup - 1][0] - began, "total_s": total, "code": code_version(), "device": device,
    }


HEADER = ("| preset | mixer | device | threads | compile | batch x tokens | timed steps | median step (s) | tokens/s | tokens/CPU-s "
          "| warm-up incl. first validation (s) | code |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def row(r: dict) -> str:
    return (f"| {r['preset']} | {r['mixer']} | {r['device']} | {r['threads']} | {r['compile']} | {r['batch']} | {r['timed_steps']} "
            f"| {r['median_step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_cpu_s']:,.0f} | {r['first_steps_s']:.1f} | {r['code']} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="debug", help="comma-separated presets (debug, small)")
    p.add_argument("--mixer", default="gdn", help="comma-separated linear mixers (gdn, mamba2)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--threads", default="2", help="comma-separated torch thread counts")
    p.add_argument("--compile", default="off", help="comma-separated: off, on")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="a change to the preset (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (timings then include the per-step loss read-back)")
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be >= 1")
    compiles = [c.strip() for c in args.compile.split(",")]
    if not set(compiles) <= {"off", "on"}:
        p.error(f"--compile takes off and/or on, got {args.compile!r}")
    print(HEADER, flush=True)
    combos = itertools.product(args.preset.split(","), args.mixer.split(","), [int(n) for n in args.threads.split(",")], compiles)
    for name, mixer, threads, comp in combos:
        print(row(measure(name.strip(), mixer.strip(), args.steps, args.warmup, threads, comp == "on", args.set,
                              args.device)), flush=True)


if __name__ == "__main__":
    main()
