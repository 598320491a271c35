"""Where training's validation windows come from, and whether a stream can train at all.

Validation is either the tail of the training stream (the last `train.val_fraction` of its rows,
cut on the patch grid) or a separate `(L_val, C)` array given by the user, in which case the whole
training stream trains. Either part must hold one window of `train.window_tokens` patches.
`check_trainable` refuses, before any step runs, a stream (or validation array) that could not
train, saying what to change.
"""

from dataclasses import dataclass

import numpy as np
import torch

from oryx_ts.config import OryxConfig
from oryx_ts.datasets.windows import WindowSampler

__all__ = ["Split", "check_trainable", "rows_needed", "split_stream"]


@dataclass
class Split:
    """The training and validation windows of one run, and a description of where they came from.

    info: `{"source": "tail" | "array", "rows": validation rows, "windows": validation windows}`,
    plus `"start"` (the first validation row of the stream) for the tail.
    """

    train: WindowSampler
    val: WindowSampler
    train_rows: int
    info: dict


def _as_stream(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float32))


def _fits(rows: int, window_tokens: int, config: OryxConfig) -> tuple[bool, bool]:
    """(training split holds a window, validation split holds a window) for a stream of `rows` steps."""
    P = config.tokenizer.patch_len
    window = window_tokens * P
    split = int(rows * (1 - config.train.val_fraction))
    return split >= window, -(-split // P) * P + window <= rows


def rows_needed(config: OryxConfig) -> int:
    """The fewest stream rows that give `config` one training window and one validation window (validation from the tail)."""
    rows = config.train.window_tokens * config.tokenizer.patch_len
    while not all(_fits(rows, config.train.window_tokens, config)):
        rows += 1
    return rows


def _check_values(values: torch.Tensor, names: tuple[str, ...], what: str, *, constant: bool) -> None:
    finite = torch.isfinite(values)
    if not finite.any():
        raise ValueError(f"{what} ({values.shape[0]} rows x {values.shape[1]} channels) has no finite value: every value is missing")
    for c, name in enumerate(names):
        column = values[:, c][finite[:, c]]
        if column.numel() == 0:
            raise ValueError(f"{name!r} has no finite value in {what} (every row is missing); leave it out (--channels)")
        if constant and column.numel() > 1 and bool((column == column[0]).all()):
            raise ValueError(f"{name!r} is constant ({column[0].item():g} in every observed row): there is nothing to forecast; "
                             "leave it out (--channels)")


def check_trainable(
    values: torch.Tensor,
    config: OryxConfig,
    channels: tuple[str, ...] | None = None,
    *,
    val_values: torch.Tensor | None = None,
) -> None:
    """Refuse a `(L, C)` stream that cannot train `config`, saying why and what to change.

    Raises `ValueError` for an all-missing stream, a channel with no finite value, a constant
    channel, a horizon that a training window cannot hold (`head.horizon <= window - patch_len`,
    else its far steps never meet a target), or a stream too short for one training and
    one validation window (naming the rows needed, which split is short and the settings that
    lower the need). With `val_values` (a separate validation array of the same channels) the
    whole stream trains and `val_values` must hold one window and some finite value per channel.
    """
    names = channels or tuple(f"channel {c}" for c in range(values.shape[1]))
    _check_values(values, names, "the stream", constant=True)
    t, P, Hz = config.train, config.tokenizer.patch_len, config.head.horizon
    window = t.window_tokens * P
    if Hz > window - P:  # the first token of a window forecasts rows [P, P + Hz): the window must hold them
        raise ValueError(f"head.horizon={Hz} does not fit a training window of train.window_tokens={t.window_tokens} x "
                         f"tokenizer.patch_len={P} = {window} steps: a token's forecast must end inside the window "
                         f"(horizon <= window - patch_len = {window - P}), else its last steps never meet a target; "
                         f"raise train.window_tokens to at least {-(-Hz // P) + 1} (--set train.window_tokens=N) or lower the horizon")
    rows = values.shape[0]
    if val_values is not None:
        if val_values.dim() != 2 or val_values.shape[1] != values.shape[1]:
            raise ValueError(f"the validation array has shape {tuple(val_values.shape)}; expected (length, {values.shape[1]}), "
                             "the channels of the training stream")
        _check_values(val_values, names, "the validation array", constant=False)
        for what, n in (("training stream", rows), ("validation array", val_values.shape[0])):
            if n < window:
                raise ValueError(f"the {what} has {n} rows, shorter than one window of train.window_tokens={t.window_tokens} x "
                                 f"tokenizer.patch_len={P} = {window} steps; lower train.window_tokens "
                                 f"(--set train.window_tokens=N; {max(1, n // P)} fits) or give more rows")
        return
    has_train, has_val = _fits(rows, t.window_tokens, config)
    if has_train and has_val:
        return
    split = int(rows * (1 - t.val_fraction))
    val_span, train_span = f"the validation split is rows [{split}, {rows})", f"the training split is rows [0, {split})"
    short = f"{val_span}, shorter than a window" if has_train else (
        f"{train_span}, shorter than a window" if has_val else f"{train_span} and {val_span}: both are shorter than a window")
    fitting = [w for w in range(t.window_tokens - 1, 0, -1) if all(_fits(rows, w, config))]
    lower = f"train.window_tokens={fitting[0]} fits these {rows} rows" if fitting else "no window_tokens fits these rows"
    val_hint = "raise train.val_fraction (--val-fraction F)" if has_train else "lower train.val_fraction (--val-fraction F)"
    raise ValueError(
        f"the stream has {rows} rows, too few: one window of train.window_tokens={t.window_tokens} x tokenizer.patch_len={P} "
        f"= {window} steps must fit in the training split and another in the validation split "
        f"(the last train.val_fraction={t.val_fraction:g}); {short}. "
        f"This config needs at least {rows_needed(config)} rows. Lower train.window_tokens (--set train.window_tokens=N; "
        f"{lower}), {val_hint} or give a separate validation file (--val-data)"
    )


def split_stream(values: torch.Tensor, config: OryxConfig, val_values: torch.Tensor | None = None) -> Split:
    """The run's windows: from the head and the tail of `values`, or all of `values` and all of `val_values`.

    Windows start on the patch grid of the array they come from. Assumes `check_trainable` passed.
    """
    P = config.tokenizer.patch_len
    window = config.train.window_tokens * P
    if val_values is not None:
        val = WindowSampler(val_values, window, align=P)
        return Split(WindowSampler(values, window, align=P), val, int(values.shape[0]),
                     {"source": "array", "rows": int(val_values.shape[0]), "windows": len(val)})
    split = int(values.shape[0] * (1 - config.train.val_fraction))
    val = WindowSampler(values, window, start=split, align=P)
    return Split(WindowSampler(values, window, stop=split, align=P), val, split,
                 {"source": "tail", "start": split, "rows": int(values.shape[0]) - split, "windows": len(val)})
