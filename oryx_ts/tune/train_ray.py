"""`oryx-ts train --workers N`: `oryx_ts.train`'s training under Ray Train (`TorchTrainer`, DDP).

`fit` is the training loop of `oryx_ts.train.train` (the same windows, mode patterns, optimizer,
schedule, clipping and validation, drawn in the same order from the same seeded generator) with
three additions: every worker draws the same global batch of `train.batch_size` windows and
keeps its shard (`rank::world_size`), so gradients averaged by DDP are those of the global batch;
a callback after every step (Tune's per-step reports for ASHA); and a resumable loop state
(model, optimizer, schedule, generator = the data cursor, step, history). With one worker and no
resume it reproduces `train()` exactly (tested). Not supported here: `train()`'s time budget.

`train_distributed` runs `fit` on N Ray Train workers: gloo on CPU, NCCL on GPUs; rank 0 reports
a checkpoint of the loop state every `train.val_every` steps, so a failed worker restarts the run
from its last checkpoint (`FailureConfig(max_failures)`) and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from oryx_ts.config import OryxConfig
from oryx_ts.datasets.windows import WindowSampler
from oryx_ts.model import OryxForecaster
from oryx_ts.train import check_trainable, lr_factor, sample_modes, validation_loss

__all__ = ["LoopState", "fit", "train_distributed"]

LOOP_FILE = "loop.json"
LOOP_TENSORS = "loop.safetensors"


@dataclass
class LoopState:
    """Everything a run needs to continue where it stopped."""

    model: OryxForecaster
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    step: int = 0
    history: list[dict] = field(default_factory=list)

    def save(self, directory: str | Path) -> Path:
        """Write the state as safetensors (model, optimizer moments, generator) plus JSON (the rest); nothing pickled."""
        directory = Path(directory)
        opt = self.optimizer.state_dict()
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        moments: dict[str, dict[str, Any]] = {}
        for idx, entry in opt["state"].items():
            moments[str(idx)] = {}
            for name, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{idx}.{name}"] = value.detach().cpu().contiguous()
                else:
                    moments[str(idx)][name] = value
        tensors["generator"] = self.generator.get_state()
        save_file(tensors, str(directory / LOOP_TENSORS))
        meta = {"config": self.model.config.to_dict(), "param_groups": opt["param_groups"], "moments": moments,
                "scheduler": self.scheduler.state_dict(), "step": self.step, "history": self.history}
        (directory / LOOP_FILE).write_text(json.dumps(meta))
        return directory / LOOP_FILE

    def load(self, directory: str | Path) -> None:
        """Read a state written by `save`; raises `ValueError` for a missing, corrupt or mismatched one."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / LOOP_FILE).read_text())
            tensors = load_file(str(directory / LOOP_TENSORS))
        except (OSError, json.JSONDecodeError, SafetensorError) as e:
            raise ValueError(f"cannot read the training state in {directory}: {e}") from e
        if OryxConfig.from_dict(meta["config"]) != self.model.config:
            raise ValueError(f"{directory} was written for another config than this run's")
        self.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict[str, Any]] = {}
        for idx, rest in meta["moments"].items():
            state[int(idx)] = dict(rest)
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.scheduler.load_state_dict(meta["scheduler"])
        self.generator.set_state(tensors["generator"])
        self.step, self.history = int(meta["step"]), list(meta["history"])


class _Loss(torch.nn.Module):
    """The model's loss as a module's forward, so DDP (which hooks `forward`) syncs its gradients."""

    def __init__(self, model: OryxForecaster):
        super().__init__()
        self.model = model

    def forward(self, x_BLC: torch.Tensor, modes_T: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x_BLC, modes_T)


def _new_state(config: OryxConfig, model: OryxForecaster | None) -> LoopState:
    t = config.train
    torch.manual_seed(t.seed)
    generator = torch.Generator().manual_seed(t.seed)
    model = model or OryxForecaster(config)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, t.warmup_steps, t.steps))
    return LoopState(model, opt, sched, generator)


def fit(
    config: OryxConfig,
    values: np.ndarray | torch.Tensor,
    *,
    model: OryxForecaster | None = None,
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    resume: str | Path | None = None,
    on_step: Callable[[LoopState, dict], None] | None = None,
    stop_after: int | None = None,
) -> LoopState:
    """Train on a `(L, C)` stream as `oryx_ts.train.train` does, on shard `rank` of `world_size`.

    `wrap` wraps the loss module (DDP under Ray Train); `resume` is a directory holding a saved
    `LoopState`; `on_step(state, record)` runs after every optimizer step (record: step,
    train_loss, grad_norm, lr and val_loss when validated); `stop_after` ends the loop after that
    step (to interrupt a run in tests). Returns the loop state; the model is left in eval mode.
    Raises `ValueError` when the global batch does not split evenly over the workers, and as `train()`.
    """
    t = config.train
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world_size {world_size}")
    if t.batch_size % world_size:
        raise ValueError(f"train.batch_size={t.batch_size} does not split over {world_size} workers; give a multiple of {world_size}")
    values = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if values.dim() != 2 or values.shape[1] != config.tokenizer.channels:
        raise ValueError(f"expected a stream of shape (length, {config.tokenizer.channels}), got {tuple(values.shape)}")
    check_trainable(values, config)
    P = config.tokenizer.patch_len
    window = t.window_tokens * P
    split = int(values.shape[0] * (1 - t.val_fraction))
    train_windows = WindowSampler(values, window, stop=split, align=P)
    val_windows = WindowSampler(values, window, start=split, align=P)

    state = _new_state(config, model)
    if resume is not None:
        state.load(resume)
    model = state.model
    device = next(model.parameters()).device
    loss_module = _Loss(model)
    loss_fn = wrap(loss_module) if wrap is not None else loss_module
    model.train()
    if state.step == 0:
        state.history.append({"step": 0, "val_loss": validation_loss(model, val_windows, batch_size=t.batch_size)})
    while state.step < t.steps:
        state.step += 1
        x = train_windows.sample(t.batch_size, state.generator)
        modes = sample_modes(t.window_tokens, config, state.generator).to(device)
        loss = loss_fn(x[rank::world_size].to(device), modes)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        lr = state.optimizer.param_groups[0]["lr"]
        state.optimizer.step()
        state.scheduler.step()
        record = {"step": state.step, "train_loss": loss.item(), "grad_norm": float(grad_norm), "lr": lr}
        if state.step % t.val_every == 0 or state.step == t.steps:
            record["val_loss"] = validation_loss(model, val_windows, batch_size=t.batch_size)
        state.history.append(record)
        if on_step is not None:
            on_step(state, record)
        if stop_after is not None and state.step >= stop_after:
            break
    model.eval()
    return state


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
    state = _new_state(config, trained)
    with result.checkpoint.as_directory() as d:
        state.load(d)
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
