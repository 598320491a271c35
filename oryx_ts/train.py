"""Training: mixed-mode quantile regression on windows of one long stream.

Windows come from the head of the stream, validation from its tail. Each batch gets one mode
pattern shared by its windows (so attention is computed only for the attention chunks): chunks of
`mode_chunk` tokens run in attention mode with probability `attention_fraction`, and a share
`full_mode_fraction` of batches runs entirely in one mode, half of them all-attention, so that
each mode alone and every mix work.

`train_router` fits a `LearnedRouter` against a trained, frozen forecaster (see its docstring).
"""

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from oryx_ts.checkpoint import DataInfo, fingerprint, save
from oryx_ts.config import BudgetConfig, OryxConfig
from oryx_ts.datasets.windows import WindowSampler
from oryx_ts.model import OryxForecaster
from oryx_ts.routers.features import mark_lookahead, novelty_scores, surprise_features, surprise_targets
from oryx_ts.routers.heuristics import RouterInputs
from oryx_ts.routers.learned import LearnedRouter
from oryx_ts.routers.runtime import forecast_steps


@dataclass
class TrainResult:
    """A trained model, its loss history and where it was saved.

    steps: the optimizer steps run; time_budget: with `max_seconds`, how the schedule was fitted
    (`max_seconds`, `planned_steps`, `steps`, `seconds_per_step`, `stopped_early`), else None.
    """

    model: OryxForecaster
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    steps: int = 0
    seconds: float = 0.0
    time_budget: dict | None = None

    @property
    def val_losses(self) -> list[float]:
        return [h["val_loss"] for h in self.history if "val_loss" in h]


def fixed_schedule(n_tokens: int, every: int = 4, offset: int | None = None) -> torch.Tensor:
    """1-in-`every` attention schedule over tokens: token n runs attention when n % every == offset (default every-1)."""
    offset = every - 1 if offset is None else offset
    return (torch.arange(n_tokens) % every == offset).float()


def sample_modes(n_tokens: int, config: OryxConfig, generator: torch.Generator) -> torch.Tensor:
    """A training mode pattern `(n_tokens,)`: random chunks, or a whole window in one mode."""
    t = config.train
    u = torch.rand(2, generator=generator)
    if u[0] < t.full_mode_fraction:
        return torch.full((n_tokens,), float(u[1] < 0.5))
    n_chunks = -(-n_tokens // t.mode_chunk)
    chunk_modes = (torch.rand(n_chunks, generator=generator) < t.attention_fraction).float()
    return chunk_modes.repeat_interleave(t.mode_chunk)[:n_tokens]


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier of optimizer step `step + 1`: linear warmup, then a cosine that reaches 0.1 at step `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _fits(rows: int, window_tokens: int, config: OryxConfig) -> tuple[bool, bool]:
    """(training split holds a window, validation split holds a window) for a stream of `rows` steps."""
    P = config.tokenizer.patch_len
    window = window_tokens * P
    split = int(rows * (1 - config.train.val_fraction))
    return split >= window, -(-split // P) * P + window <= rows


def rows_needed(config: OryxConfig) -> int:
    """The fewest stream rows that give `config` one training window and one validation window."""
    rows = config.train.window_tokens * config.tokenizer.patch_len
    while not all(_fits(rows, config.train.window_tokens, config)):
        rows += 1
    return rows


def check_trainable(values: torch.Tensor, config: OryxConfig, channels: tuple[str, ...] | None = None) -> None:
    """Refuse a `(L, C)` stream that cannot train `config`, saying why and what to change.

    Raises `ValueError` for an all-missing stream, a channel with no finite value, a constant
    channel, or a stream too short for one training and one validation window (naming the rows
    needed, which split is short and the settings that lower the need).
    """
    names = channels or tuple(f"channel {c}" for c in range(values.shape[1]))
    finite = torch.isfinite(values)
    if not finite.any():
        raise ValueError(f"the stream ({values.shape[0]} rows x {values.shape[1]} channels) has no finite value: every value is missing")
    for c, name in enumerate(names):
        column = values[:, c][finite[:, c]]
        if column.numel() == 0:
            raise ValueError(f"{name!r} has no finite value (every row is missing); leave it out (--channels)")
        if column.numel() > 1 and bool((column == column[0]).all()):
            raise ValueError(f"{name!r} is constant ({column[0].item():g} in every observed row): there is nothing to forecast; "
                             "leave it out (--channels)")
    rows, t = values.shape[0], config.train
    has_train, has_val = _fits(rows, t.window_tokens, config)
    if has_train and has_val:
        return
    P = config.tokenizer.patch_len
    split = int(rows * (1 - t.val_fraction))
    val_span, train_span = f"the validation split is rows [{split}, {rows})", f"the training split is rows [0, {split})"
    short = f"{val_span}, shorter than a window" if has_train else (
        f"{train_span}, shorter than a window" if has_val else f"{train_span} and {val_span}: both are shorter than a window")
    fitting = [w for w in range(t.window_tokens - 1, 0, -1) if all(_fits(rows, w, config))]
    lower = f"train.window_tokens={fitting[0]} fits these {rows} rows" if fitting else "no window_tokens fits these rows"
    val_hint = "raise train.val_fraction (--set train.val_fraction=F)" if has_train else "lower train.val_fraction (--set train.val_fraction=F)"
    raise ValueError(
        f"the stream has {rows} rows, too few: one window of train.window_tokens={t.window_tokens} x tokenizer.patch_len={P} "
        f"= {t.window_tokens * P} steps must fit in the training split and another in the validation split "
        f"(the last train.val_fraction={t.val_fraction:g}); {short}. "
        f"This config needs at least {rows_needed(config)} rows. Lower train.window_tokens (--set train.window_tokens=N; "
        f"{lower}) or {val_hint}"
    )


@torch.no_grad()
def validation_loss(model: OryxForecaster, sampler: WindowSampler, *, batch_size: int, max_batches: int = 8) -> float:
    """Mean loss over validation windows in the 1-in-4 schedule."""
    was_training = model.training
    model.eval()
    T = sampler.window // model.config.tokenizer.patch_len
    device = next(model.parameters()).device
    modes = fixed_schedule(T).to(device)
    losses = [model.loss(x.to(device), modes).item() for _, x in zip(range(max_batches), sampler.sequential(batch_size))]
    model.train(was_training)
    return float(np.mean(losses))


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


def new_loop_state(config: OryxConfig, model: OryxForecaster | None, total: list[int] | None = None) -> LoopState:
    """A fresh loop: seeded generator, AdamW with decay on matrices only, warm-up and cosine schedule over `total[0]` steps."""
    t = config.train
    torch.manual_seed(t.seed)
    generator = torch.Generator().manual_seed(t.seed)
    model = model or OryxForecaster(config)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
    total = total if total is not None else [t.steps]  # a list: a time budget shortens the schedule once it is fitted
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, t.warmup_steps, total[0]))
    return LoopState(model, opt, sched, generator)


def fit(
    config: OryxConfig,
    values: np.ndarray | torch.Tensor,
    *,
    model: OryxForecaster | None = None,
    device: str | torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    resume: str | Path | None = None,
    on_step: Callable[[LoopState, dict], None] | None = None,
    stop_after: int | None = None,
    max_seconds: float | None = None,
    probe_steps: int = 5,
    progress: bool = False,
) -> tuple[LoopState, dict | None]:
    """The one training loop: mixed-mode windows of a `(L, C)` stream, on shard `rank` of `world_size`.

    Every worker draws the same global batch of `train.batch_size` windows from the same seeded
    generator and keeps its shard (`rank::world_size`), so gradients averaged by DDP (`wrap`) are
    those of the global batch. `resume`: a directory holding a saved `LoopState`. `on_step(state,
    record)` runs after every optimizer step. `stop_after` ends the loop after that step.
    `max_seconds`: after `probe_steps` timed steps the step count is capped so that the cosine
    schedule ends at the budget (never above `train.steps`); a machine that slows down stops at the
    budget. Returns the loop state (model in eval mode) and the time budget's record (or None).
    Raises `ValueError` for a stream that cannot train or a batch that does not split over the workers.
    """
    t = config.train
    began = time.perf_counter()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world_size {world_size}")
    if t.batch_size % world_size:
        raise ValueError(f"train.batch_size={t.batch_size} does not split over {world_size} workers; give a multiple of {world_size}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    values = torch.as_tensor(np.asarray(values, dtype=np.float32))
    P = config.tokenizer.patch_len
    window = t.window_tokens * P
    split = int(values.shape[0] * (1 - t.val_fraction))
    train_windows = WindowSampler(values, window, stop=split, align=P)
    val_windows = WindowSampler(values, window, start=split, align=P)

    total = [t.steps]
    if model is not None and device is not None:
        model.to(device)
    state = new_loop_state(config, model, total)
    if resume is not None:
        state.load(resume)
    model = state.model
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    loss_module = _Loss(model)
    loss_fn = wrap(loss_module) if wrap is not None else loss_module
    model.train()
    val_began = time.perf_counter()
    if state.step == 0:
        state.history.append({"step": 0, "val_loss": validation_loss(model, val_windows, batch_size=t.batch_size)})
    val_seconds = time.perf_counter() - val_began
    loop_began, first = time.perf_counter(), state.step
    probe = min(t.steps, max(1, probe_steps))
    budget = None
    bar = tqdm(total=total[0], initial=state.step, desc="train", disable=not progress, dynamic_ncols=True)
    while state.step < total[0]:
        if max_seconds is not None and state.step >= probe and time.perf_counter() - began > max_seconds:
            total[0] = state.step  # the budget ran out before the fitted schedule did
            budget["stopped_early"] = True
            break
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
        if max_seconds is not None and state.step - first == probe:
            per_step = (time.perf_counter() - loop_began) / probe
            cost = per_step + val_seconds / t.val_every  # a validation every val_every steps
            left = max_seconds - (time.perf_counter() - began) - val_seconds  # the final validation
            total[0] = max(state.step, min(t.steps, state.step + int(left / cost)))
            budget = {"max_seconds": max_seconds, "planned_steps": t.steps, "seconds_per_step": per_step, "stopped_early": False}
            bar.total = total[0]
            bar.refresh()
        if state.step % t.val_every == 0 or state.step == total[0]:
            record["val_loss"] = validation_loss(model, val_windows, batch_size=t.batch_size)
            bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{record['val_loss']:.4f}")
        state.history.append(record)
        bar.update(1)
        if on_step is not None:
            on_step(state, record)
        if stop_after is not None and state.step >= stop_after and state.step < total[0]:
            bar.close()
            model.eval()
            return state, budget  # interrupted: resumed later, validated then
    bar.close()
    if "val_loss" not in state.history[-1]:
        state.history[-1]["val_loss"] = validation_loss(model, val_windows, batch_size=t.batch_size)
    if budget is not None:
        budget["steps"] = total[0]
    model.eval()
    return state, budget


def train(
    config: OryxConfig,
    values: np.ndarray | torch.Tensor,
    *,
    model: OryxForecaster | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    data: DataInfo | None = None,
    max_seconds: float | None = None,
    probe_steps: int = 5,
) -> TrainResult:
    """Fit an OryxForecaster on a `(L, C)` stream (NaN = missing) and return it with its loss history.

    The model trains on `device` (default: where `model` is, else the CPU); windows are cut from
    the stream in host memory and moved there batch by batch. `model` (e.g. a loaded checkpoint)
    is trained further instead of a fresh one. The loop is `fit` (one process, one worker).

    The last `config.train.val_fraction` of the stream is held out for validation. If `out_dir` is
    given, the final model is saved there as a checkpoint, with `data` (the file's channel names,
    step and timestamp column) completed by the stream's length, training span, fingerprint and
    the tokenizer's normalization policy.

    `max_seconds`: a time budget (see `fit`); how it went is in `TrainResult.time_budget` and the
    checkpoint's extra.

    Raises `ValueError` if the stream does not match the config's channel count or cannot train
    (see `check_trainable`: all missing, a missing or constant channel, too few rows).
    """
    values = torch.as_tensor(np.asarray(values, dtype=np.float32))
    C = config.tokenizer.channels
    if values.dim() != 2 or values.shape[1] != C:
        raise ValueError(f"expected a stream of shape (length, {C}), got {tuple(values.shape)}")
    if data is not None and len(data.channels) != C:
        raise ValueError(f"data names {len(data.channels)} channels {list(data.channels)}, the stream has {C}")
    check_trainable(values, config, data.channels if data is not None else None)
    began = time.perf_counter()
    state, budget = fit(config, values, model=model, device=device, max_seconds=max_seconds, probe_steps=probe_steps, progress=progress)
    result = TrainResult(model=state.model, history=state.history, steps=state.step, time_budget=budget)
    result.seconds = time.perf_counter() - began
    if out_dir is not None:
        split = int(values.shape[0] * (1 - config.train.val_fraction))
        if data is not None:
            tk = config.tokenizer
            data = dataclasses.replace(
                data, rows=int(values.shape[0]), train_rows=split, fingerprint=fingerprint(values),
                normalization={"kind": "causal_ema", "decay": tk.norm_decay, "eps": tk.norm_eps, "clip": tk.clip},
            )
        extra = {"history": result.history, "steps": result.steps, "seconds": round(result.seconds, 2)}
        if result.time_budget is not None:
            extra["time_budget"] = result.time_budget
        result.checkpoint = save(state.model, out_dir, extra=extra, data=data)
    return result


@dataclass
class RouterTrainResult:
    router: LearnedRouter
    history: list[dict] = field(default_factory=list)


def router_inputs(model: OryxForecaster, x_BLC: torch.Tensor) -> RouterInputs:
    """Router inputs for windows that start a stream: surprise from the all-recurrent forecasts of the previous tokens.

    Streaming computes the same features from the forecasts the routed model made; under a small
    budget those are mostly recurrent, which is why training reads the all-recurrent ones.
    """
    config = model.config
    P, Pf = config.tokenizer.patch_len, forecast_steps(config)
    B, L, C = x_BLC.shape
    T = L // P
    with torch.no_grad():
        base = model(x_BLC)
        tokens = model.embed(x_BLC)
    prev = torch.cat([base.new_zeros(B, 1, Pf, C, base.shape[-1]), base[:, :-1, :Pf]], dim=1)
    feats, _ = surprise_features(
        x_BLC.reshape(B, T, P, C), prev, torch.arange(T) > 0, torch.zeros(B, dtype=torch.float64),
        median_index=config.head.median_index, decay=config.router.surprise_decay,
    )
    return RouterInputs(tokens, feats, torch.arange(T).expand(B, T))


def batch_targets(inputs: RouterInputs, fraction: float, lookahead: int = 0) -> torch.Tensor:
    """Label-free router targets `(B, T)` for a batch of windows, pooled over the batch.

    Novelty is standardized over all windows of the batch together and the `fraction` most novel
    tokens of the batch are positives, so a quiet window may hold none and a busy one many (a
    per-window quota would teach the router to spend in every window, on noise when it is quiet).
    """
    B, T, F = inputs.surprise_BTF.shape
    has_prev = (inputs.positions_BT > 0).reshape(-1)
    pooled = novelty_scores(inputs.surprise_BTF.reshape(1, B * T, F), has_prev)
    hot = surprise_targets(pooled, has_prev, fraction=fraction).reshape(B, T)
    return mark_lookahead(hot, lookahead)  # within each window: the windows are separate streams


def train_router(
    model: OryxForecaster,
    values: np.ndarray | torch.Tensor,
    *,
    router: LearnedRouter | None = None,
    budget: BudgetConfig | None = None,
    label_mask: np.ndarray | None = None,
    progress: bool = True,
) -> RouterTrainResult:
    """Fit a learned router on the training part of a `(L, C)` stream against the frozen `model`.

    Per batch of windows: router logits from token embeddings and surprise features; modes relaxed
    with logistic noise (binary Gumbel) so the forecast loss reaches the router; a dual variable
    (of either sign) holds the mean attention probability at the budget's `fraction` (`budget`,
    default `model.config.budget`), so the router
    learns where to spend that rate, not whether to spend it. Router settings come from
    `router.config` when a router is given, else from `model.config.router`. `label_mask` (L,)
    booleans, used only when `label_weight > 0`, adds a cross-entropy on labelled tokens.

    With `surprise_weight > 0` a label-free cross-entropy also fits the logits to
    `batch_targets`: the budget `fraction` of the batch's tokens whose own patch is most
    unusual under the all-recurrent forecasts (`features.novelty_scores`: the worst channel's
    error, the dispersion or the flatness of the patch, whichever stands out most), each with the
    `surprise_lookahead` tokens before it. The router sees only causal features, so it
    learns what announces a surprising patch. The forecaster's weights are left as they were.
    Raises `ValueError` for a stream of the wrong shape.
    """
    config = model.config
    rc, t = (router.config if router is not None else config.router), config.train
    fraction = (budget or config.budget).fraction
    if fraction <= 0:
        raise ValueError("a router trained for a budget fraction of 0 would never route; give a fraction > 0")
    values = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if values.dim() != 2 or values.shape[1] != config.tokenizer.channels:
        raise ValueError(f"expected a stream of shape (length, {config.tokenizer.channels}), got {tuple(values.shape)}")
    P = config.tokenizer.patch_len
    window = t.window_tokens * P
    split = int(values.shape[0] * (1 - t.val_fraction))
    sampler = WindowSampler(values, window, stop=split, align=P)
    labels = None if label_mask is None or rc.label_weight == 0 else torch.as_tensor(np.asarray(label_mask, dtype=bool))

    torch.manual_seed(rc.seed)
    generator = torch.Generator().manual_seed(rc.seed)
    router = router or LearnedRouter(config.block.d_model, rc)
    router.train()
    opt = torch.optim.AdamW(router.parameters(), lr=rc.lr, weight_decay=0.0)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    dual = 0.0
    result = RouterTrainResult(router=router)
    try:
        bar = tqdm(range(1, rc.steps + 1), desc="router", disable=not progress, dynamic_ncols=True)
        for step in bar:
            starts = sampler.starts[torch.randint(len(sampler.starts), (rc.batch_size,), generator=generator)]
            x = sampler.windows_at(starts)
            inputs = router_inputs(model, x)
            logits = router.logits(inputs)
            modes = router.relaxed_modes(logits, generator)
            forecast_loss = model.loss(x, modes)
            rate = torch.sigmoid(logits).mean()
            loss = forecast_loss + dual * (rate - fraction)
            record = {}
            if rc.surprise_weight > 0:
                targets = batch_targets(inputs, fraction, rc.surprise_lookahead)
                surprise_loss = F.binary_cross_entropy_with_logits(logits, targets)
                loss = loss + rc.surprise_weight * surprise_loss
                record["surprise_loss"] = surprise_loss.item()
            if labels is not None:
                token_labels = torch.stack([labels[s : s + window].reshape(-1, P).any(1) for s in starts.tolist()])
                loss = loss + rc.label_weight * router.label_loss(logits, token_labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # an equality constraint: the dual may turn negative and pay for attention when the router spends too little
            dual = dual + rc.dual_lr * (rate.item() - fraction)
            result.history.append({"step": step, "forecast_loss": forecast_loss.item(), "rate": rate.item(), "dual": dual, **record})
            bar.set_postfix(loss=f"{forecast_loss.item():.4f}", rate=f"{rate.item():.3f}", dual=f"{dual:.3f}")
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    router.eval()
    return result
