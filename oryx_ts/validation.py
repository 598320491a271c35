"""Where training's validation windows come from, and whether a stream can train at all.

Validation is either the tail of the training stream (the last `train.val_fraction` of its rows,
cut on the patch grid) or a separate `(L_val, C)` array given by the user, in which case the whole
training stream trains. The training part must hold one window of `train.window_tokens` patches.
Validation windows are as long as training windows when the validation part holds one, else the
longest whole number of patches it holds (they then see less context than training does, the same
windows at every evaluation); the least is `min_val_tokens`: one token and its whole horizon.
`check_trainable` refuses, before any step runs, a stream (or validation array) that could not
train, saying what to change.
"""

from dataclasses import dataclass

import torch

from oryx_ts.config import OryxConfig
from oryx_ts.datasets.windows import WindowSampler

__all__ = ["Split", "check_trainable", "min_val_tokens", "rows_needed", "split_stream", "univariate", "val_tokens"]


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


def min_val_tokens(config: OryxConfig) -> int:
    """The fewest patches a validation window may have: the first token's whole horizon must lie inside it."""
    return -(-config.head.horizon // config.tokenizer.patch_len) + 1


def val_tokens(rows: int, config: OryxConfig) -> int:
    """Patches per validation window over a validation part of `rows` steps that starts on the patch grid."""
    return min(config.train.window_tokens, rows // config.tokenizer.patch_len)


def _tail(rows: int, config: OryxConfig) -> tuple[int, int]:
    """(rows that train, first validation row on the patch grid) of a stream of `rows` steps."""
    P = config.tokenizer.patch_len
    split = int(rows * (1 - config.train.val_fraction))
    return split, -(-split // P) * P


def _fits(rows: int, window_tokens: int, config: OryxConfig) -> tuple[bool, bool]:
    """(training split holds a window, validation split holds a validation window) for a stream of `rows` steps."""
    split, first = _tail(rows, config)
    return split >= window_tokens * config.tokenizer.patch_len, val_tokens(rows - first, config) >= min_val_tokens(config)


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
    else its far steps never meet a target), or a stream too short for one training window and
    one validation window of at least `min_val_tokens` patches (naming the rows needed, which
    split is short and the settings that lower the need). With `val_values` (a separate
    validation array of the same channels) the whole stream trains and `val_values` must hold
    `min_val_tokens` patches and some finite value per channel.
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
    rows, least = values.shape[0], min_val_tokens(config)
    if val_values is not None:
        if val_values.dim() != 2 or val_values.shape[1] != values.shape[1]:
            raise ValueError(f"the validation array has shape {tuple(val_values.shape)}; expected (length, {values.shape[1]}), "
                             "the channels of the training stream")
        _check_values(val_values, names, "the validation array", constant=False)
        if rows < window:
            raise ValueError(f"the training stream has {rows} rows, shorter than one window of train.window_tokens={t.window_tokens} "
                             f"x tokenizer.patch_len={P} = {window} steps; lower train.window_tokens "
                             f"(--set train.window_tokens=N; {max(1, rows // P)} fits) or give more rows")
        if val_tokens(val_values.shape[0], config) < least:
            raise ValueError(f"the validation array has {val_values.shape[0]} rows, fewer than one validation window of {least} "
                             f"patches x tokenizer.patch_len={P} = {least * P} steps (a token and its horizon of "
                             f"head.horizon={Hz} steps); give more rows")
        return
    has_train, has_val = _fits(rows, t.window_tokens, config)
    if has_train and has_val:
        return
    split = int(rows * (1 - t.val_fraction))
    val_span, train_span = f"the validation split is rows [{split}, {rows})", f"the training split is rows [0, {split})"
    short = (f"{val_span}, shorter than {least * P} steps" if has_train else
             f"{train_span}, shorter than {window} steps" if has_val else f"{train_span} and {val_span}: both are too short")
    if has_train:
        fix = "Raise train.val_fraction (--val-fraction F) or give a separate validation file (--val-data)"
    else:
        fitting = [w for w in range(t.window_tokens - 1, least - 1, -1) if all(_fits(rows, w, config))]
        lower = f"train.window_tokens={fitting[0]} fits these {rows} rows" if fitting else "no window_tokens fits these rows"
        fix = (f"Lower train.window_tokens (--set train.window_tokens=N; {lower})"
               + (", lower train.val_fraction (--val-fraction F)" if has_val else "") + " or give more rows")
    raise ValueError(
        f"the stream has {rows} rows, too few: one window of train.window_tokens={t.window_tokens} x tokenizer.patch_len={P} "
        f"= {window} steps must fit in the training split, and the validation split (the last "
        f"train.val_fraction={t.val_fraction:g}) must hold {least} patches = {least * P} steps, a token and its horizon of "
        f"head.horizon={Hz}; {short}. This config needs at least {rows_needed(config)} rows. {fix}"
    )


def univariate(config: OryxConfig, values: torch.Tensor) -> bool:
    """Whether a 1-channel model learns from every column of a wider stream, each column a series of its own."""
    return config.tokenizer.channels == 1 and values.shape[1] > 1


def split_stream(values: torch.Tensor, config: OryxConfig, val_values: torch.Tensor | None = None) -> Split:
    """The run's windows: from the head and the tail of `values`, or all of `values` and all of `val_values`.

    Windows start on the patch grid of the array they come from; validation windows have
    `val_tokens` patches (`info["window_tokens"]`). Assumes `check_trainable` passed.
    """
    P = config.tokenizer.patch_len
    window = config.train.window_tokens * P
    per = univariate(config, values)
    align = 1 if config.train.any_phase else P  # validation windows stay on the patch grid
    if val_values is not None:
        T = val_tokens(val_values.shape[0], config)
        val = WindowSampler(val_values, T * P, align=P, per_channel=per)
        return Split(WindowSampler(values, window, align=align, per_channel=per), val, int(values.shape[0]),
                     {"source": "array", "rows": int(val_values.shape[0]), "windows": len(val), "window_tokens": T})
    rows = int(values.shape[0])
    split, first = _tail(rows, config)
    T = val_tokens(rows - first, config)
    val = WindowSampler(values, T * P, start=split, align=P, per_channel=per)
    return Split(WindowSampler(values, window, stop=split, align=align, per_channel=per), val, split,
                 {"source": "tail", "start": split, "rows": rows - split, "windows": len(val), "window_tokens": T})
