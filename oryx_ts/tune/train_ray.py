"""`oryx-ts train --workers N`: `oryx_ts.train`'s training under Ray Train (`TorchTrainer`, DDP).

`oryx_ts.train.fit` is the one training loop (`train()` runs it as one worker): every worker
draws the same global batch of `train.batch_size` windows and keeps its shard
(`rank::world_size`), so gradients averaged by DDP are those of the global batch; a callback
runs after every step (Tune's per-step reports for ASHA); and the loop state (model, optimizer,
schedule, generator = the data cursor, step, history) is saved as safetensors plus JSON and resumed.

`train_distributed` runs `fit` on N Ray Train workers: gloo on CPU, NCCL on GPUs; rank 0 reports
a checkpoint of the loop state every `train.val_every` steps, so a failed worker restarts the run
from its last checkpoint (`FailureConfig(max_failures)`) and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oryx_ts.config import OryxConfig
from oryx_ts.model import OryxForecaster
from oryx_ts.train import LoopState, check_trainable, fit, new_loop_state

__all__ = ["LoopState", "fit", "train_distributed"]

def _worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: `fit` on its shard, DDP over the process group Ray Train set up."""
    import ray.train
    from ray.train.torch import get_device

    torch.set_num_threads(loop_config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    config = OryxConfig.from_json(loop_config["config"])
    device = get_device()
    model = _seeded_model(config, loop_config["init"]).to(device)
    ddp = lambda m: torch.nn.parallel.DistributedDataParallel(  # noqa: E731
        m, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    checkpoint = ray.train.get_checkpoint()
    began = time.perf_counter()
    first_step = [None]

    def report(state: LoopState, record: dict) -> None:
        if first_step[0] is None:
            first_step[0] = state.step - 1
        marker = loop_config["fail_marker"]
        if state.step == loop_config["fail_at"] and rank == world - 1 and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)  # tests: a worker dies once, after a checkpoint; the run must resume from it
        last = state.step == config.train.steps
        if "val_loss" not in record and not last:
            return
        metrics = {**record, "seconds": time.perf_counter() - began, "steps_run": state.step - first_step[0], "world_size": world}
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                state.save(d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)

    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            fit(config, loop_config["values"], model=model, rank=rank, world_size=world, wrap=ddp, resume=d, on_step=report)
    else:
        fit(config, loop_config["values"], model=model, rank=rank, world_size=world, wrap=ddp, on_step=report)


def _seeded_model(config: OryxConfig, init: OryxForecaster | None) -> OryxForecaster:
    """The model a run starts from: `init`, or a fresh one under the training seed (as `train()` makes it)."""
    if init is not None:
        return init
    torch.manual_seed(config.train.seed)
    return OryxForecaster(config)


@dataclass
class DistributedResult:
    """What `train_distributed` returns: the trained model, the loss history and throughput."""

    model: OryxForecaster
    history: list[dict]
    seconds: float
    tokens_per_second: float
    checkpoint: Path | None = None

    @property
    def val_losses(self) -> list[float]:
        return [h["val_loss"] for h in self.history if "val_loss" in h]


def train_distributed(
    config: OryxConfig,
    values: np.ndarray,
    *,
    workers: int,
    storage: str | Path,
    name: str = "train",
    use_gpu: bool | None = None,
    model: OryxForecaster | None = None,
    out_dir: str | Path | None = None,
    data=None,
    threads_per_worker: int = 1,
    max_failures: int = 0,
    fail_at: int | None = None,
    address: str | None = None,
) -> DistributedResult:
    """Train `config` on `workers` Ray Train workers (DDP; NCCL when `use_gpu`, default when CUDA is present, else gloo).

    `storage`: where Ray Train keeps the run and its checkpoints (never ~/ray_results);
    `max_failures`: restarts from the last checkpoint after a worker fails; `fail_at`: tests only,
    the last worker exits once, at that step (before its report; make it a step after a checkpoint). Saves an oryx_ts checkpoint to `out_dir`
    when given. Starts an embedded local Ray unless one is running or `address` is given.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from oryx_ts.checkpoint import save
    from oryx_ts.tune.local import init_ray

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if config.train.batch_size % workers:
        raise ValueError(f"train.batch_size={config.train.batch_size} does not split over {workers} workers; give a multiple of {workers}")
    values = np.asarray(values, dtype=np.float32)
    check_trainable(torch.as_tensor(values), config)
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    init_ray(address, num_cpus=max(workers * threads_per_worker, os.cpu_count() or 1))
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": config.to_json(), "values": values, "init": model, "threads": threads_per_worker,
                           "fail_at": fail_at, "fail_marker": str(Path(storage).resolve() / f".{name}.failed")},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": threads_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(Path(storage).resolve()),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    began = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - began
    if result.error is not None:
        raise RuntimeError(f"Ray Train run failed: {result.error}") from result.error
    trained = OryxForecaster(config)
    state = new_loop_state(config, trained)
    with result.checkpoint.as_directory() as d:
        state.load(d)
    if config.train.keep_best:
        state.restore_best()  # the last checkpoint holds the last step's weights and the best ones
    trained.eval()
    metrics = result.metrics or {}
    run_seconds = float(metrics.get("seconds", seconds))
    steps_run = int(metrics.get("steps_run", config.train.steps))
    tokens = steps_run * config.train.batch_size * config.train.window_tokens
    out = DistributedResult(trained, state.history, run_seconds, tokens / run_seconds if run_seconds > 0 else float("nan"))
    if out_dir is not None:
        out.checkpoint = save(trained, out_dir, extra={"history": state.history, "steps": state.step, "workers": workers,
                                                       "seconds": round(run_seconds, 2)}, data=data)
    return out


def train_command(args, config: OryxConfig, values: np.ndarray, *, model: OryxForecaster | None, data=None) -> int:
    """`oryx-ts train --workers N`: `train_distributed` with the command's checkpoint directory; prints as `train` does."""
    from oryx_ts.tune.local import shutdown_ray

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.max_minutes is not None:
        raise ValueError("--max-minutes is not supported with --workers; set train.steps instead")
    threads = max(1, (args.threads or os.cpu_count() or 1) // args.workers)
    try:
        result = train_distributed(config, values, workers=args.workers, storage=Path(args.out) / "ray", model=model,
                                   out_dir=args.out, data=data, threads_per_worker=threads, address=getattr(args, "address", None))
    finally:
        shutdown_ray()
    print(f"validation loss {result.val_losses[0]:.4f} -> {result.val_losses[-1]:.4f}; {config.train.steps} steps on "
          f"{args.workers} workers in {result.seconds:.0f}s ({result.tokens_per_second:,.0f} tokens/s); checkpoint: {result.checkpoint}")
    return 0
