"""Online adaptation: a small per-series correction on the quantile head's output, learned from matured targets.

Legend: B series, M pending forecasts of a series, Hz horizon steps, C channels, Q quantile levels
(increasing; m is the index of the one nearest 0.5, the median).

Everything here is in the *normalized units* of each forecast's origin token (the engine
subtracts the token's running mean and divides by its std before calling), so one configuration
fits series of any scale.

The correction, per series:

    y'_q = y_q + b[h, c] + (exp(s[c]) - 1) * (y_q - y_m)

that is `(y_m + b) + exp(s) * (y_q - y_m)`: a bias per (horizon step, channel) that moves the whole
distribution and a log-scale per channel that widens or narrows the spread around the median.
Why this form: the frozen model's typical online failures are a level it has not caught up with
(regime or level shift: a bias, which can differ by horizon step as the normalization catches
up) and a spread that is too narrow or too wide for the current regime (one scale per channel).
It has Hz*C + C parameters, it keeps the quantiles ordered for any parameter values (the spread
is multiplied by a positive number), and at zero it is exactly the identity. Written with
`expm1(s)` so that the identity state returns the frozen forecast bit for bit; `apply` also
passes identity series through untouched so that non-finite inputs stay as they were.

Learning: each `update` takes `steps` (sub)gradient steps on the mean pinball loss of the
entries that matured with this patch, and only those: an entry is used once, when it is
observed, so nothing is fitted twice and nothing is used before it is observed. Work is
O(steps * M * Hz * C * Q) per token. A patch matures about one entry per (horizon step,
channel), too few to learn Hz*C biases alone without chasing noise, so the bias step is split: its
mean over horizon steps (the channel-wide level, which sees about Hz entries per patch) moves at
`lr`, and each step's deviation from that mean at `lr_horizon` (smaller). Each parameter's change
per step is clipped to `max_step` and the parameters stay within `bias_bound` / `log_scale_bound`.

Guard: per series, exponentially weighted sums (horizon `guard_window` matured entries) of the
pinball loss of the adapted forecasts (the adapter as it stands before this update's step) and
of the frozen forecasts on the same entries. Once at least `guard_min` entries have matured
since the last reset and the adapted sum exceeds the frozen one by more than `guard_margin`
(relative), the adapter is rolled back to the identity, the sums and count are reset,
`rollbacks_B` increments and the series' step size `rate_B` is halved (it grows back towards 1
by a factor `1 + 1/guard_window` per matured entry): without that, an adapter whose rate lets it
diverge within a patch or two diverges again right after every rollback, and the guard, which
needs `guard_min` entries to judge, would never catch up with it (measured in the tests: a
noise-chasing adapter costs 14% over the frozen model unguarded, 1% guarded). Rolling back to the
identity rather than to a last good copy: the frozen model is the one baseline known to be safe,
a copy doubles the state, and a copy's "goodness" is measured over the same window that just
went bad.

Measured on synthetic streams (tests/streams/test_adapter.py, P=8, Hz=16, C=2, Q=3, defaults):
after a level shift of one noise std the adapted pinball loss is ~0.73 of the frozen one; on a
stationary stream with calibrated frozen forecasts it is ~1.001 of it.

`AdapterState` is a plain dataclass of tensors with a leading series axis: the engine selects,
concatenates, scatters and serializes it generically over `dataclasses.fields`. `update`
changes it in place (its tensors are reassigned, never resized); `apply` does not touch it.
"""

import math
from dataclasses import dataclass

import torch

from oryx_ts.config import HeadConfig


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Online adaptation of one series' forecasts; rates and bounds are in normalized units."""

    enabled: bool = True
    lr: float = 0.1  # channel-wide bias step per unit mean subgradient
    lr_horizon: float = 0.01  # per-horizon-step deviation of the bias from its channel mean
    lr_scale: float = 0.02  # log-scale of the spread
    steps: int = 1  # gradient steps per update on the entries that just matured
    max_step: float = 0.1  # largest change of any parameter in one step
    bias_bound: float = 3.0
    log_scale_bound: float = 1.5
    guard_window: int = 1024  # matured entries (forecast, horizon step, channel) in the guard's window
    guard_margin: float = 0.02  # relative excess of the adapted loss over the frozen one that rolls back
    guard_min: int = 256  # matured entries since the last reset before the guard may act

    def __post_init__(self) -> None:
        _check(isinstance(self.enabled, bool), f"AdapterConfig.enabled must be a bool, got {self.enabled!r}")
        for name in ("lr", "lr_horizon", "lr_scale", "guard_margin"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0, f"AdapterConfig.{name} must be finite and >= 0, got {value}")
        for name in ("max_step", "bias_bound", "log_scale_bound"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0, f"AdapterConfig.{name} must be finite and > 0, got {value}")
        for name in ("steps", "guard_window"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"AdapterConfig.{name} must be an int >= 1, got {value!r}")
        _check(
            isinstance(self.guard_min, int) and self.guard_min >= 0,
            f"AdapterConfig.guard_min must be an int >= 0, got {self.guard_min!r}",
        )


@dataclass
class AdapterState:
    """Per-series adapter parameters and guard statistics; every field has a leading series axis B."""

    bias_BHzC: torch.Tensor  # float32, normalized units
    log_scale_BC: torch.Tensor  # float32
    loss_adapted_B: torch.Tensor  # float32, windowed pinball loss sum of the adapted forecasts
    loss_frozen_B: torch.Tensor  # float32, same entries, frozen forecasts
    count_B: torch.Tensor  # int64, matured entries since the last reset (guard_min is checked on it)
    rollbacks_B: torch.Tensor  # int64
    updates_B: torch.Tensor  # int64, updates that took a step (at least one matured entry)
    rate_B: torch.Tensor  # float32, step-size multiplier: halved by each rollback, recovers towards 1


def _pinball_BMHzC(pred_BMHzCQ: torch.Tensor, target_BMHzC: torch.Tensor, q_Q: torch.Tensor) -> torch.Tensor:
    """Pinball loss per entry, mean over quantile levels; the target must be finite where it is used."""
    diff_BMHzCQ = target_BMHzC[..., None] - pred_BMHzCQ
    return torch.maximum(q_Q * diff_BMHzCQ, (q_Q - 1) * diff_BMHzCQ).mean(-1)


class Adapter:
    """Applies and updates per-series `AdapterState`s; holds only the configuration and shapes.

    Args:
        config: the adaptation settings (`enabled=False` makes `apply` the identity and `update` a no-op).
        horizon: Hz, horizon steps of each forecast.
        channels: C.
        quantiles: the Q increasing quantile levels of the head, in (0, 1).

    Raises:
        ValueError: on a non-positive horizon or channel count, or quantiles that are not increasing in (0, 1).
    """

    def __init__(self, config: AdapterConfig, horizon: int, channels: int, quantiles: tuple[float, ...]):
        head = HeadConfig(horizon=horizon, quantiles=tuple(quantiles))
        _check(isinstance(channels, int) and channels >= 1, f"channels must be an int >= 1, got {channels!r}")
        self.config = config
        self.horizon = horizon
        self.channels = channels
        self.quantiles = head.quantiles
        self.median = head.median_index

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> AdapterState:
        """The identity adapter with empty guard sums for `batch_size` series."""
        _check(batch_size >= 0, f"batch_size must be >= 0, got {batch_size}")
        B, Hz, C = batch_size, self.horizon, self.channels
        return AdapterState(
            bias_BHzC=torch.zeros(B, Hz, C, device=device),
            log_scale_BC=torch.zeros(B, C, device=device),
            loss_adapted_B=torch.zeros(B, device=device),
            loss_frozen_B=torch.zeros(B, device=device),
            count_B=torch.zeros(B, dtype=torch.int64, device=device),
            rollbacks_B=torch.zeros(B, dtype=torch.int64, device=device),
            updates_B=torch.zeros(B, dtype=torch.int64, device=device),
            rate_B=torch.ones(B, device=device),
        )

    def _check_pred(self, pred: torch.Tensor, st: AdapterState, lead: int) -> None:
        want = (st.bias_BHzC.shape[0], *(["M"] * lead), self.horizon, self.channels, len(self.quantiles))
        got = tuple(pred.shape)
        ok = pred.dim() == len(want) and got[0] == want[0] and got[1 + lead :] == want[1 + lead :]
        _check(ok, f"forecast shape must be {want}, got {got}")

    def _adapt(self, bias_BHzC: torch.Tensor, log_scale_BC: torch.Tensor, pred_BXHzCQ: torch.Tensor) -> torch.Tensor:
        """The correction for parameters of any leading shape matching `pred` (X: zero or more pending axes)."""
        X = pred_BXHzCQ.dim() - 4
        shape_B = (bias_BHzC.shape[0],) + (1,) * X
        b = bias_BHzC.reshape(*shape_B, self.horizon, self.channels, 1)
        g = torch.expm1(log_scale_BC).reshape(*shape_B, 1, self.channels, 1)
        m = self.median
        return pred_BXHzCQ + b + g * (pred_BXHzCQ - pred_BXHzCQ[..., m : m + 1])

    def _is_identity_B(self, st: AdapterState) -> torch.Tensor:
        return (st.bias_BHzC == 0).flatten(1).all(1) & (st.log_scale_BC == 0).all(1)

    def apply(self, st: AdapterState, pred_BHzCQ: torch.Tensor) -> torch.Tensor:
        """Corrected forecasts `(B, Hz, C, Q)` in normalized units; quantiles stay ordered.

        Series whose adapter is the identity (and every series when disabled) get their input back
        unchanged. Does not modify `st`. Raises `ValueError` on a shape mismatch.
        """
        self._check_pred(pred_BHzCQ, st, lead=0)
        if not self.config.enabled:
            return pred_BHzCQ
        out_BHzCQ = self._adapt(st.bias_BHzC, st.log_scale_BC, pred_BHzCQ)
        return torch.where(self._is_identity_B(st)[:, None, None, None], pred_BHzCQ, out_BHzCQ)

    def update(
        self,
        st: AdapterState,
        pred_BMHzCQ: torch.Tensor,
        target_BMHzC: torch.Tensor,
        new_BMHzC: torch.Tensor,
    ) -> None:
        """Learn from the entries that matured with this patch; updates `st` in place.

        Args:
            st: the series' adapter states.
            pred_BMHzCQ: the M pending *frozen* forecasts of each series, each in the normalized units of
                its own origin.
            target_BMHzC: their targets in the same units, NaN where not (yet) observed.
            new_BMHzC: bool, the entries that matured with this patch. Only entries that are new, have a finite
                target and a finite forecast are used; a series with none is left exactly as it was.

        Order: the guard sums take the losses of the adapted forecasts (the adapter before this
        update) and of the frozen ones; then the parameter steps; then the guard check, which may
        roll the series back to the identity.

        Raises:
            ValueError: on shape or dtype mismatches.
        """
        self._check_pred(pred_BMHzCQ, st, lead=1)
        _check(
            target_BMHzC.shape == pred_BMHzCQ.shape[:-1] and new_BMHzC.shape == pred_BMHzCQ.shape[:-1],
            f"target and new must have shape {tuple(pred_BMHzCQ.shape[:-1])}, "
            f"got {tuple(target_BMHzC.shape)} and {tuple(new_BMHzC.shape)}",
        )
        _check(new_BMHzC.dtype == torch.bool, f"new must be a bool mask, got {new_BMHzC.dtype}")
        if not self.config.enabled:
            return
        cfg = self.config
        # computed in the state's dtype so that the state never changes dtype
        pred_BMHzCQ = pred_BMHzCQ.to(st.bias_BHzC.dtype)
        target_BMHzC = target_BMHzC.to(st.bias_BHzC.dtype)
        q_Q = torch.tensor(self.quantiles, dtype=pred_BMHzCQ.dtype, device=pred_BMHzCQ.device)
        used_BMHzC = new_BMHzC & torch.isfinite(target_BMHzC) & torch.isfinite(pred_BMHzCQ).all(-1)
        target_BMHzC = torch.where(used_BMHzC, target_BMHzC, 0.0)
        pred_BMHzCQ = torch.where(used_BMHzC[..., None], pred_BMHzCQ, 0.0)
        w_BMHzC = used_BMHzC.to(pred_BMHzCQ.dtype)
        n_B = used_BMHzC.flatten(1).sum(1)
        active_B = n_B > 0

        adapted_BMHzCQ = self._adapt(st.bias_BHzC, st.log_scale_BC, pred_BMHzCQ)
        loss_a_B = (_pinball_BMHzC(adapted_BMHzCQ, target_BMHzC, q_Q) * w_BMHzC).flatten(1).sum(1)
        loss_f_B = (_pinball_BMHzC(pred_BMHzCQ, target_BMHzC, q_Q) * w_BMHzC).flatten(1).sum(1)
        # an exponential window over entries, advanced by however many matured in this patch
        decay_B = (1.0 - 1.0 / cfg.guard_window) ** n_B.to(pred_BMHzCQ.dtype)
        loss_adapted_B = decay_B * st.loss_adapted_B + loss_a_B
        loss_frozen_B = decay_B * st.loss_frozen_B + loss_f_B
        count_B = st.count_B + n_B
        # a healthy series earns its full step size back over a few guard windows
        rate_B = (st.rate_B * (1.0 + 1.0 / cfg.guard_window) ** n_B.to(pred_BMHzCQ.dtype)).clamp_max(1.0)

        bias_BHzC, log_scale_BC = st.bias_BHzC, st.log_scale_BC
        n_BHzC = w_BMHzC.sum(1)
        n_BC = n_BHzC.sum(1)
        m = self.median
        for i in range(cfg.steps):
            if i > 0:
                adapted_BMHzCQ = self._adapt(bias_BHzC, log_scale_BC, pred_BMHzCQ)
            # subgradient of the mean pinball loss with respect to each adapted quantile
            dy_BMHzCQ = ((target_BMHzC[..., None] < adapted_BMHzCQ).to(q_Q.dtype) - q_Q) / len(self.quantiles)
            dy_BMHzCQ = dy_BMHzCQ * w_BMHzC[..., None]
            db_BHzC = dy_BMHzCQ.sum((1, -1))
            spread_BMHzCQ = adapted_BMHzCQ - adapted_BMHzCQ[..., m : m + 1]
            ds_BC = (dy_BMHzCQ * spread_BMHzCQ).sum((1, 2, -1))

            level_BC = db_BHzC.sum(1) / n_BC.clamp_min(1)
            dev_BHzC = torch.where(n_BHzC > 0, db_BHzC / n_BHzC.clamp_min(1) - level_BC[:, None], 0.0)
            step_b_BHzC = rate_B[:, None, None] * (cfg.lr * level_BC[:, None] + cfg.lr_horizon * dev_BHzC)
            step_b_BHzC = step_b_BHzC.clamp(-cfg.max_step, cfg.max_step)
            step_s_BC = (rate_B[:, None] * cfg.lr_scale * ds_BC / n_BC.clamp_min(1)).clamp(-cfg.max_step, cfg.max_step)
            bias_BHzC = (bias_BHzC - step_b_BHzC).clamp(-cfg.bias_bound, cfg.bias_bound)
            log_scale_BC = (log_scale_BC - step_s_BC).clamp(-cfg.log_scale_bound, cfg.log_scale_bound)

        bad_B = active_B & (count_B >= cfg.guard_min) & (loss_adapted_B > (1.0 + cfg.guard_margin) * loss_frozen_B)
        keep_B = active_B & ~bad_B
        # series with nothing new keep every field bit for bit; rolled-back ones return to the identity
        keep_B11, bad_B11 = keep_B[:, None, None], bad_B[:, None, None]
        st.bias_BHzC = torch.where(keep_B11, bias_BHzC, torch.where(bad_B11, 0.0, st.bias_BHzC))
        st.log_scale_BC = torch.where(keep_B[:, None], log_scale_BC, torch.where(bad_B[:, None], 0.0, st.log_scale_BC))
        st.loss_adapted_B = torch.where(keep_B, loss_adapted_B, torch.where(bad_B, 0.0, st.loss_adapted_B))
        st.loss_frozen_B = torch.where(keep_B, loss_frozen_B, torch.where(bad_B, 0.0, st.loss_frozen_B))
        st.count_B = torch.where(keep_B, count_B, torch.where(bad_B, 0, st.count_B))
        st.rate_B = torch.where(keep_B, rate_B, torch.where(bad_B, 0.5 * st.rate_B, st.rate_B))
        st.rollbacks_B = st.rollbacks_B + bad_B.to(torch.int64)
        st.updates_B = st.updates_B + active_B.to(torch.int64)

    def gain(self, st: AdapterState) -> torch.Tensor:
        """`(B,)` 1 - adapted / frozen pinball loss over the guard window since the last reset.

        The guard's view (the adapter as it stood when each entry matured), not the score of the
        forecasts as emitted, which the engine's audits keep. NaN before any matured entry.
        """
        ok_B = (st.count_B > 0) & (st.loss_frozen_B > 0)
        return torch.where(ok_B, 1.0 - st.loss_adapted_B / st.loss_frozen_B.clamp_min(1e-30), float("nan"))
