"""Training: mixed-mode quantile regression on windows of one long stream.

Windows come from the head of the stream and validation from its tail, or from a separate
validation array (`oryx_ts.validation`). Each batch gets one mode pattern shared by its windows
(so attention is computed only for the attention chunks): chunks of `mode_chunk` tokens run in
attention mode with probability `attention_fraction`, and a share `full_mode_fraction` of batches
runs entirely in one mode, half of them all-attention, so that each mode alone and every mix work.

Every `train.val_every` steps (and at the start and the end) the model is scored on the same
validation windows; the weights with the lowest validation loss are kept (`LoopState`) and, with
`train.keep_best`, are the ones returned and saved. With `train.patience = N > 0` the run stops
after N evaluations in a row without a new best (those during the warm-up do not count).

`train_router` fits a `LearnedRouter` against a trained, frozen forecaster (see its docstring).
"""

import dataclasses
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from oryx_ts.checkpoint import DataInfo, fingerprint, save
from oryx_ts.config import BudgetConfig, OryxConfig, RouterConfig
from oryx_ts.datasets.windows import WindowSampler
from oryx_ts.guide import Guide, guided_loss, mixer_inputs, window_targets
from oryx_ts.loop_state import LOOP_FILE, LOOP_TENSORS, LoopState, lr_factor, new_loop_state
from oryx_ts.model import OryxForecaster
from oryx_ts.routers.features import mark_lookahead, novelty_scores, surprise_features, surprise_targets
from oryx_ts.routers.heuristics import RouterInputs
from oryx_ts.routers.learned import LearnedRouter
from oryx_ts.routers.runtime import forecast_steps
from oryx_ts.validation import check_trainable, rows_needed, split_stream

__all__ = ["LOOP_FILE", "LOOP_TENSORS", "LoopState", "TrainResult", "check_trainable", "fit", "fixed_schedule", "lr_factor",
           "new_loop_state", "router_windows", "rows_needed", "sample_modes", "train", "train_router", "validation_loss"]


@dataclass
class TrainResult:
    """A trained model, its loss history and where it was saved.

    steps: the optimizer steps run; time_budget: with `max_seconds`, how the schedule was fitted
    (`max_seconds`, `planned_steps`, `fitted_steps`: the schedule's length after the probe, `steps`
    run, `seconds_per_step`, `stopped_early`: the budget ran out before the fitted schedule did),
    else None. validation: where the validation windows came
    from (`source` "tail" or "array", `rows`, `windows`), `best_step` and `best_val_loss`, the
    `curve` `[[step, val_loss], ...]`, `stopped` ("patience" when early stopping ended the run,
    else None), `patience` and `keep_best`. `model` holds the best weights when `keep_best`.
    """

    model: OryxForecaster
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    steps: int = 0
    seconds: float = 0.0
    time_budget: dict | None = None
    validation: dict = field(default_factory=dict)

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


class _Loss(torch.nn.Module):
    """The model's loss as a module's forward, so DDP (which hooks `forward`) syncs its gradients."""

    def __init__(self, model: OryxForecaster):
        super().__init__()
        self.model = model

    def forward(self, x_BLC: torch.Tensor, modes_T: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x_BLC, modes_T)


def _as_stream(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float32))


def fit(
    config: OryxConfig,
    values: np.ndarray | torch.Tensor,
    *,
    val_values: np.ndarray | torch.Tensor | None = None,
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
    guide: Guide | None = None,
) -> tuple[LoopState, dict | None]:
    """The one training loop: mixed-mode windows of a `(L, C)` stream, on shard `rank` of `world_size`.

    Every worker draws the same global batch of `train.batch_size` windows from the same seeded
    generator and keeps its shard (`rank::world_size`), so gradients averaged by DDP (`wrap`) are
    those of the global batch. `val_values`: a separate `(L_val, C)` validation array (then all of
    `values` trains), default the stream's last `train.val_fraction`. `resume`: a directory
    holding a saved `LoopState` (best weights, patience count and fitted schedule included).
    `on_step(state, record)` runs after every optimizer step. `stop_after` ends the loop after
    that step (an interruption: the model keeps its current weights, to be resumed).

    Validation runs before the first step, every `train.val_every` steps and after the last one;
    `train.patience` > 0 stops the run after that many evaluations in a row without a new best
    (counted after the warm-up), and `train.keep_best` loads the best weights into the model at
    the end. Early stopping ends the run where it is; the schedule is not refitted.

    `max_seconds`: after `probe_steps` timed steps the step count is capped so that the cosine
    schedule ends at the budget (never above `train.steps`; the validations' cost counted); a
    machine that slows down stops at the budget, after a last validation. Returns the loop state
    (model in eval mode) and the time budget's record (or None). Raises `ValueError` for a stream
    that cannot train or a batch that does not split over the workers.

    `guide`: guided attention (`oryx_ts.guide`): its loss, on the training windows' tokens that have
    a target, is added to the forecast loss (`guide.weight`) on the steps it is active for; the
    record's `guide_loss` holds it.
    """
    t = config.train
    began = time.perf_counter()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world_size {world_size}")
    if t.batch_size % world_size:
        raise ValueError(f"train.batch_size={t.batch_size} does not split over {world_size} workers; give a multiple of {world_size}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    values = _as_stream(values)
    val = None if val_values is None else _as_stream(val_values)
    split = split_stream(values, config, val)

    if model is not None and device is not None:
        model.to(device)
    state = new_loop_state(config, model)
    if resume is not None:
        state.load(resume)
    total = state.total
    model = state.model
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    loss_module = _Loss(model)
    loss_fn = wrap(loss_module) if wrap is not None else loss_module
    model.train()

    def validate() -> tuple[float, bool]:
        loss = validation_loss(model, split.val, batch_size=t.batch_size)
        return loss, state.observe(loss, patience=t.patience, warmup_steps=t.warmup_steps)

    val_began = time.perf_counter()
    if state.step == 0 and not state.history:
        state.history.append({"step": 0, "val_loss": validate()[0]})
    val_seconds = time.perf_counter() - val_began
    loop_began, first = time.perf_counter(), state.step
    probe = min(t.steps, max(1, probe_steps))
    budget = None
    stopping = state.stopped is not None
    bar = tqdm(total=total[0], initial=state.step, desc="train", disable=not progress, dynamic_ncols=True)
    while not stopping and state.step < total[0]:
        if max_seconds is not None and state.step - first >= probe and time.perf_counter() - began > max_seconds:
            total[0] = state.step  # the budget ran out before the fitted schedule did
            budget["stopped_early"] = True
            break
        state.step += 1
        starts, channels = split.train.draw(t.batch_size, state.generator)
        x = split.train.windows_at(starts, channels)
        modes = sample_modes(t.window_tokens, config, state.generator).to(device)
        guided = guide is not None and guide.active(state.step)
        with mixer_inputs(model) if guided else nullcontext() as caught:
            loss = loss_fn(x[rank::world_size].to(device), modes)
        objective = loss
        if guided:
            targets = window_targets(guide.targets_T, starts[rank::world_size], config.tokenizer.patch_len, t.window_tokens)
            guide_loss = guided_loss(model, caught, targets, guide.heads)
            objective = loss + guide.weight * guide_loss
        state.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        lr = state.optimizer.param_groups[0]["lr"]
        state.optimizer.step()
        state.scheduler.step()
        record = {"step": state.step, "train_loss": loss.item(), "grad_norm": float(grad_norm), "lr": lr}
        if guided:
            record["guide_loss"] = guide_loss.item()
        if max_seconds is not None and state.step - first == probe:
            per_step = (time.perf_counter() - loop_began) / probe
            cost = per_step + val_seconds / t.val_every  # a validation every val_every steps
            left = max_seconds - (time.perf_counter() - began) - val_seconds  # the final validation
            total[0] = max(state.step, min(t.steps, state.step + int(left / cost)))
            budget = {"max_seconds": max_seconds, "planned_steps": t.steps, "fitted_steps": total[0], "seconds_per_step": per_step,
                      "stopped_early": False}
            bar.total = total[0]
            bar.refresh()
        if state.step % t.val_every == 0 or state.step == total[0]:
            record["val_loss"], stopping = validate()
            bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{record['val_loss']:.4f}", best=state.best_step)
        state.history.append(record)
        bar.update(1)
        if on_step is not None:
            on_step(state, record)
        if stop_after is not None and state.step >= stop_after and state.step < total[0] and not stopping:
            bar.close()
            model.eval()
            return state, budget  # interrupted: resumed later, validated then
    bar.close()
    if "val_loss" not in state.history[-1]:
        state.history[-1]["val_loss"] = validate()[0]
    if budget is not None:
        budget["steps"] = state.step
    if t.keep_best:
        state.restore_best()
    model.eval()
    return state, budget


def train(
    config: OryxConfig,
    values: np.ndarray | torch.Tensor,
    *,
    val_values: np.ndarray | torch.Tensor | None = None,
    model: OryxForecaster | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    data: DataInfo | None = None,
    max_seconds: float | None = None,
    probe_steps: int = 5,
    guide: Guide | None = None,
) -> TrainResult:
    """Fit an OryxForecaster on a `(L, C)` stream (NaN = missing) and return it with its loss history.

    The model trains on `device` (default: where `model` is, else the CPU); windows are cut from
    the stream in host memory and moved there batch by batch. `model` (e.g. a loaded checkpoint)
    is trained further instead of a fresh one. The loop is `fit` (one process, one worker).

    Validation: the `(L_val, C)` array `val_values` when given (then the whole stream trains),
    else the last `config.train.val_fraction` of the stream. The returned (and saved) model has
    the weights of the lowest validation loss when `train.keep_best` (the default), else the last
    step's; `train.patience` > 0 stops early (see `fit`). If `out_dir` is given, the model is
    saved there as a checkpoint, with `data` (the file's channel names, step and timestamp column)
    completed by the stream's length, training span, fingerprint and the tokenizer's normalization
    policy; its extra holds the history, `TrainResult.validation` (best step, the validation
    curve, why it stopped) and the time budget's record.

    `max_seconds`: a time budget (see `fit`); how it went is in `TrainResult.time_budget`. `guide`:
    guided attention on the training windows (see `fit`).

    A 1-channel config trained on a `(L, C)` stream learns from each column as a series of its own
    (channel-independent training: C times the windows; `validation.univariate`).

    Raises `ValueError` if the stream (or `val_values`) does not match the config's channel count
    or cannot train (see `check_trainable`: all missing, a missing or constant channel, too few
    rows, a horizon longer than a window holds).
    """
    values = _as_stream(values)
    val = None if val_values is None else _as_stream(val_values)
    C = config.tokenizer.channels
    if values.dim() != 2 or (values.shape[1] != C and C != 1):  # a 1-channel model learns from every column (`univariate`)
        raise ValueError(f"expected a stream of shape (length, {C}), got {tuple(values.shape)}")
    if data is not None and len(data.channels) != (values.shape[1] if data.univariate else C):
        raise ValueError(f"data names {len(data.channels)} channels {list(data.channels)}, the stream has {C}")
    names = data.channels if data is not None and len(data.channels) == values.shape[1] else None
    check_trainable(values, config, names, val_values=val)
    began = time.perf_counter()
    state, budget = fit(config, values, val_values=val, model=model, device=device, max_seconds=max_seconds,
                        probe_steps=probe_steps, progress=progress, guide=guide)
    t, split = config.train, split_stream(values, config, val)
    info = split.info | ({"fingerprint": fingerprint(val)} if val is not None else {})
    result = TrainResult(model=state.model, history=state.history, steps=state.step, time_budget=budget,
                         validation={**info, **state.summary(), "patience": t.patience, "keep_best": t.keep_best})
    result.seconds = time.perf_counter() - began
    if out_dir is not None:
        if data is not None:
            tk = config.tokenizer
            data = dataclasses.replace(
                data, rows=int(values.shape[0]), train_rows=split.train_rows, fingerprint=fingerprint(values),
                normalization={"kind": "causal_ema", "decay": tk.norm_decay, "eps": tk.norm_eps, "clip": tk.clip},
            )
        extra = {"history": result.history, "steps": result.steps, "seconds": round(result.seconds, 2), "validation": result.validation}
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


def router_windows(model: OryxForecaster, values: np.ndarray | torch.Tensor, router: LearnedRouter | None,
                   budget: BudgetConfig | None) -> tuple[RouterConfig, float, WindowSampler]:
    """What a router's training starts from: its settings (`router.config`, else the model's), the budget
    fraction (`budget`, else the model's) and the training windows of a `(L, C)` stream (the part before
    `train.val_fraction`, on the patch grid). Raises `ValueError` for a fraction of 0 or a stream of the
    wrong shape."""
    config = model.config
    rc, t = (router.config if router is not None else config.router), config.train
    fraction = (budget or config.budget).fraction
    if fraction <= 0:
        raise ValueError("a router trained for a budget fraction of 0 would never route; give a fraction > 0")
    values = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if values.dim() != 2 or values.shape[1] != config.tokenizer.channels:
        raise ValueError(f"expected a stream of shape (length, {config.tokenizer.channels}), got {tuple(values.shape)}")
    P = config.tokenizer.patch_len
    return rc, fraction, WindowSampler(values, t.window_tokens * P, stop=int(values.shape[0] * (1 - t.val_fraction)), align=P)


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
    rc, fraction, sampler = router_windows(model, values, router, budget)
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
                token_labels = torch.stack([labels[s : s + sampler.window].reshape(-1, config.tokenizer.patch_len).any(1)
                                            for s in starts.tolist()])
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
