"""The expected-FLOPs budget and the controller that turns router scores into hard modes online.

Legend: B series, W window (tokens), N token position.

A `BudgetConfig` (in the config tree) gives each token position an allowance `a_N` in FLOPs (`oryx_ts.flops` is the cost
model). The controller guarantees, for every series and every run of W consecutive tokens, that
the FLOPs spent are at most `(1 + slack)` times the allowance summed over those tokens.

How: a token may run attention only if every window that contains it still fits, counting its
past tokens as they ran and its future tokens as recurrent (which is always affordable, because
the allowance never falls below the recurrent cost). The last attention token of any window
checked that window with everything after it recurrent, so no decision can break a window that
an earlier one made safe. Past excess `cost - (1 + slack) a` of the last W-1 tokens is all the
state this needs.

Which affordable tokens take attention: a token whose score reaches the adaptive threshold `tau`
does, as long as a `reserve` of the window's surcharge allowance stays unspent; a token whose
score lies `spike_z` deviations above the running mean score may spend the reserve too, so a surprise spike can use budget saved
in quiet spans. The threshold is `tau = mean + z * dev` over running (bias-corrected EMA) mean
and mean absolute deviation of the scores, clipped to [TAU_MIN, 1]; `z` takes a stochastic
quantile step towards spending the budget rate. Being relative to the spread of the scores, the
step neither drowns the ranking of narrowly spread scores nor crawls on widely spread ones; the
clip keeps scores of 1 always above and scores of 0 always below the threshold.

Hysteresis (`BudgetConfig.hold` = h > 0): a token that its score sent to attention opens a hold of
the next h tokens, which run attention whatever their scores wherever the ordinary budget allows
(the same test as an ordinary token: the reserve stays for spikes); a held token does not extend
the hold, a token sent by its score restarts it. Held tokens pass the same window test as every
other attention token, so the guarantee is untouched. The hold's countdown is a state part of its
own (`HoldState`), present only when h > 0, so states made without hysteresis keep their layout.

A spike signal (`BudgetConfig.spike_feature` = j >= 0): surprise feature j of each token
(`routers.features`, e.g. 1, the worst channel's error against the forecast made for it) may make
it a spike too, when it lies `spike_signal_z` deviations above its own running mean (the same EMA
statistics as the scores'). A router's score blends its inputs and may rank the onset of a level
shift below the budget's threshold while the worst channel's error already stands out; the signal
lets such a token spend the reserve. It passes the same window test as a score spike, so the
guarantee is untouched. Its statistics are a state part of their own (`SpikeState`), present only
when j >= 0; a router that reads no surprise sees features of zero, which never spike.

A windowed threshold (`BudgetConfig.threshold = "window"`): instead of the running threshold, an
ordinary token asks when its score ranks among the best `k` of the last W scores (itself included,
ties in its favour), `k = rate * n + (rate * n - a)` with n the tokens of that window so far, `a` the
attention tokens among the W-1 before it and `rate` the budget's share of attention: the budget
rate's quantile of the window, lowered by as many places as the window has attention tokens it has
not run (without that term the attention tokens already run hold the top places and the rate
settles at half the budget). The quantile is exact over the budget window, so it does not lag as
`z`'s steps do. Scores of 0 never ask. It only decides which tokens ask: every one still passes the
window test, so the guarantee is untouched. Its history (the last W-1 scores and modes) is a state
part of its own (`RankState`), present only with this threshold.
"""

from dataclasses import dataclass

import numpy as np
import torch

from oryx_ts.config import BudgetConfig, OryxConfig
from oryx_ts.flops import mode_costs_at
from oryx_ts.state import register_part

TAU_MIN = 1e-6  # scores of 0 never pass; scores of 1 always reach the threshold
SCORE_EMA = 0.01  # weight of a new score in the running mean and deviation
Z_MAX = 10.0


def allowance(budget: BudgetConfig, config: OryxConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(recurrent, attention, allowance)` FLOPs (float64) of tokens at `positions` (any shape).

    The allowance is the recurrent cost plus `budget.fraction` of the attention surcharge, so it
    always covers the recurrent cost.
    """
    costs = mode_costs_at(config, positions)
    rec, att = costs.recurrent_T, costs.attention_T
    return rec, att, rec + budget.fraction * (att - rec)


@register_part
@dataclass
class ControllerState:
    """Per-series controller state: excess of the last W-1 tokens (oldest first) and the threshold's statistics."""

    excess_BW: torch.Tensor  # float64 (B, W-1)
    z_B: torch.Tensor  # float64 (B,), threshold in deviations above the mean score
    score_mean_B: torch.Tensor  # float64 (B,), EMA without bias correction
    score_dev_B: torch.Tensor  # float64 (B,), EMA of |score - mean| without bias correction

    @classmethod
    def init(cls, batch_size: int, window: int, device=None) -> "ControllerState":
        """Empty history; the threshold starts one deviation above the mean score."""
        zeros = lambda: torch.zeros(batch_size, dtype=torch.float64, device=device)  # noqa: E731
        return cls(
            excess_BW=torch.zeros(batch_size, max(window - 1, 0), dtype=torch.float64, device=device),
            z_B=zeros() + 1.0, score_mean_B=zeros(), score_dev_B=zeros(),
        )


@register_part
@dataclass
class HoldState:
    """Per-series hysteresis state: how many of the next tokens the current hold still covers."""

    left_B: torch.Tensor  # int64 (B,)

    @classmethod
    def init(cls, batch_size: int, device=None) -> "HoldState":
        return cls(left_B=torch.zeros(batch_size, dtype=torch.int64, device=device))


@register_part
@dataclass
class SpikeState:
    """Per-series running (EMA, without bias correction) mean and mean absolute deviation of the spike signal."""

    mean_B: torch.Tensor  # float64 (B,)
    dev_B: torch.Tensor  # float64 (B,)

    @classmethod
    def init(cls, batch_size: int, device=None) -> "SpikeState":
        zeros = lambda: torch.zeros(batch_size, dtype=torch.float64, device=device)  # noqa: E731
        return cls(mean_B=zeros(), dev_B=zeros())


@register_part
@dataclass
class RankState:
    """Per-series history of the windowed threshold: the last W-1 scores and modes, oldest first."""

    scores_BW: torch.Tensor  # float64 (B, W-1)
    modes_BW: torch.Tensor  # float64 (B, W-1), 1 = attention

    @classmethod
    def init(cls, batch_size: int, window: int, device=None) -> "RankState":
        zeros = lambda: torch.zeros(batch_size, max(window - 1, 0), dtype=torch.float64, device=device)  # noqa: E731
        return cls(scores_BW=zeros(), modes_BW=zeros())


def controller_step(
    scores_B: torch.Tensor, st: ControllerState, budget: BudgetConfig, config: OryxConfig, positions: int | np.ndarray | torch.Tensor,
    hold: HoldState | None = None, signal_B: torch.Tensor | None = None, spike: SpikeState | None = None, rank: RankState | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decide the modes of one token of every series and advance `st` (and `hold`, `spike`, `rank`) in place.

    `positions` are the series' token positions (one int for all, or one per series); `hold` is
    needed when `budget.hold > 0`, `signal_B` and `spike` when `budget.spike_feature >= 0`, `rank`
    when `budget.threshold == "window"` (see `controller_run`).
    Returns `(modes_B, flops_B, allowance_B)`: 1 = attention, the FLOPs that token spends, and its allowance.
    """
    scores = scores_B.detach().to(torch.float64).cpu().numpy()[:, None]
    signal = None if signal_B is None else signal_B.detach().to(torch.float64).cpu().numpy()[:, None]
    modes, flops, allow = controller_run(scores, st, budget, config, positions, hold, signal, spike, rank)
    return torch.from_numpy(modes[:, 0]).float(), torch.from_numpy(flops[:, 0]), torch.from_numpy(allow[:, 0])


def controller_run(
    scores_BT: np.ndarray, st: ControllerState, budget: BudgetConfig, config: OryxConfig, positions: int | np.ndarray | torch.Tensor,
    hold: HoldState | None = None, signal_BT: np.ndarray | None = None, spike: SpikeState | None = None, rank: RankState | None = None,
    why: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decide T consecutive tokens of every series, the first at `positions`; advances `st` (and `hold`, `spike`, `rank`) in place.

    The same arithmetic as T calls of `controller_step` (which is this with T = 1), in float64
    numpy with the costs of every position computed once. Returns `(modes_BT, flops_BT, allowance_BT)`.
    With `budget.spike_feature >= 0`, `signal_BT` is that surprise feature of each token and `spike`
    its running statistics (advanced in place): a token whose signal lies `budget.spike_signal_z`
    deviations above the signal's running mean is a spike too, whatever its score. With
    `budget.threshold == "window"`, `rank` holds the last W-1 scores and modes (advanced in place).
    A `why` dict, when given, receives `(B, T)` booleans of each decision's reason: `asked` (the
    threshold's ask), `ordinary` (asked and within the ordinary budget) and `spike` (sent as a spike
    past the ordinary budget); held tokens are attention tokens in neither.
    Raises `ValueError` for a state made for another window, for `budget.hold > 0` without a `hold`
    state, for `budget.spike_feature >= 0` without `signal_BT` and `spike`, or for the windowed
    threshold without a `rank` state of this window.
    """
    W = budget.window
    if st.excess_BW.shape[1] != max(W - 1, 0):
        raise ValueError(f"controller state holds a window of {st.excess_BW.shape[1] + 1} tokens, the budget asks for {W}")
    if budget.hold > 0 and hold is None:
        raise ValueError(f"budget.hold = {budget.hold} needs a HoldState (RoutedForecaster.init_state makes one)")
    signals = budget.spike_feature >= 0
    if signals and (signal_BT is None or spike is None):
        raise ValueError(f"budget.spike_feature = {budget.spike_feature} needs the signal and a SpikeState "
                         "(RoutedForecaster.init_state makes one)")
    ranked = budget.threshold == "window"
    if ranked and (rank is None or rank.scores_BW.shape[1] != max(W - 1, 0)):
        raise ValueError(f"budget.threshold = 'window' needs a RankState of a {W}-token window (RoutedForecaster.init_state makes one)")
    scores_BT = np.asarray(scores_BT, dtype=np.float64)
    B, T = scores_BT.shape
    if ranked:
        hist_s, hist_m = rank.scores_BW.cpu().numpy().copy(), rank.modes_BW.cpu().numpy().copy()
    if signals:
        signal_BT = np.asarray(signal_BT, dtype=np.float64)
        sig_mean, sig_dev = spike.mean_B.cpu().numpy().copy(), spike.dev_B.cpu().numpy().copy()
    pos0 = np.broadcast_to(np.asarray(torch.as_tensor(positions).cpu(), dtype=np.int64), (B,))
    rec_all, att_all, allow_all = allowance(budget, config, pos0[:, None] + np.arange(T + W)[None, :])
    k = 1 + budget.slack
    dev_ = st.score_mean_B.device
    past = st.excess_BW.cpu().numpy().copy()
    z, mean_s, dev_s = (t.cpu().numpy().copy() for t in (st.z_B, st.score_mean_B, st.score_dev_B))
    left = hold.left_B.cpu().numpy().copy() if budget.hold > 0 else np.zeros(B, dtype=np.int64)
    out_m, out_f, out_a = np.zeros((B, T)), np.zeros((B, T)), np.zeros((B, T))
    reasons = None if why is None else {k: np.zeros((B, T), dtype=bool) for k in ("asked", "ordinary", "spike")}
    w_idx = np.arange(W)[None, :]
    for t in range(T):
        rec, att, allow = rec_all[:, t : t + W], att_all[:, t : t + W], allow_all[:, t : t + W]
        pos = pos0 + t
        scores = scores_BT[:, t]
        # worst window through this token: L past tokens (newest first), this one, W-1-L future recurrent ones
        past_L = np.concatenate([np.zeros((B, 1)), np.cumsum(past[:, ::-1], axis=1)], axis=1)  # (B, W)
        past_L = np.where(w_idx > pos[:, None], -np.inf, past_L)  # windows that would start before the stream are not windows
        fut = np.concatenate([np.zeros((B, 1)), np.cumsum(rec[:, 1:] - k * allow[:, 1:], axis=1)], axis=1)  # (B, W)
        worst = (past_L + fut[:, ::-1]).max(axis=1) + (att[:, 0] - k * allow[:, 0])
        eps = 1e-12 * k * allow.sum(axis=1)
        surcharge_allow = W * (allow[:, 0] - rec[:, 0])
        fits_spike = worst <= eps
        fits_ordinary = worst <= -budget.reserve * surcharge_allow + eps
        correction = 1.0 - (1.0 - SCORE_EMA) ** (pos.astype(np.float64) + 1)  # tokens seen, this one included
        mean_s = mean_s + SCORE_EMA * (scores - mean_s)
        dev_s = dev_s + SCORE_EMA * (np.abs(scores - mean_s / correction) - dev_s)
        tau = np.clip(mean_s / correction + z * (dev_s / correction + 1e-9), TAU_MIN, 1.0)
        spike_tau = np.clip(mean_s / correction + budget.spike_z * (dev_s / correction + 1e-9), TAU_MIN, 1.0)
        peak = scores >= spike_tau
        if signals:  # the spike signal's own running statistics, as the scores'
            sig = signal_BT[:, t]
            sig_mean = sig_mean + SCORE_EMA * (sig - sig_mean)
            sig_dev = sig_dev + SCORE_EMA * (np.abs(sig - sig_mean / correction) - sig_dev)
            peak = peak | (sig >= sig_mean / correction + budget.spike_signal_z * (sig_dev / correction + 1e-9))
        rate = np.clip((allow[:, 0] - rec[:, 0]) / (att[:, 0] - rec[:, 0]), 0.0, 1.0)
        if ranked:  # among the best 2 rate n - a of the window's scores; tokens before the stream are not in it
            seen = w_idx[:, 1:] >= W - pos[:, None]  # (B, W-1), oldest first
            better = ((hist_s > scores[:, None]) & seen).sum(axis=1)
            asks = (scores >= TAU_MIN) & (better + 1 <= 2 * rate * (seen.sum(axis=1) + 1) - (hist_m * seen).sum(axis=1))
        else:
            asks = scores >= tau
        sent = (asks & fits_ordinary) | (peak & fits_spike)
        if reasons is not None:  # only when asked for: this loop is the streaming step's controller
            reasons["asked"][:, t], reasons["ordinary"][:, t] = asks, asks & fits_ordinary
            reasons["spike"][:, t] = sent & ~(asks & fits_ordinary)
        m = (sent | ((left > 0) & fits_ordinary)).astype(np.float64)
        left = np.where(sent, budget.hold, np.maximum(left - 1, 0))
        flops = rec[:, 0] + m * (att[:, 0] - rec[:, 0])
        z = np.clip(z + budget.threshold_lr * (m - rate), -Z_MAX, Z_MAX)
        if W > 1:
            past = np.concatenate([past[:, 1:], (flops - k * allow[:, 0])[:, None]], axis=1)
            if ranked:
                hist_s = np.concatenate([hist_s[:, 1:], scores[:, None]], axis=1)
                hist_m = np.concatenate([hist_m[:, 1:], m[:, None]], axis=1)
        out_m[:, t], out_f[:, t], out_a[:, t] = m, flops, allow[:, 0]
    st.z_B, st.score_mean_B, st.score_dev_B = (torch.from_numpy(a).to(dev_) for a in (z, mean_s, dev_s))
    st.excess_BW = torch.from_numpy(past).to(st.excess_BW.device)
    if budget.hold > 0:
        hold.left_B = torch.from_numpy(left).to(hold.left_B.device)
    if signals:
        spike.mean_B, spike.dev_B = (torch.from_numpy(a).to(spike.mean_B.device) for a in (sig_mean, sig_dev))
    if ranked:
        rank.scores_BW, rank.modes_BW = (torch.from_numpy(a).to(rank.scores_BW.device) for a in (hist_s, hist_m))
    if reasons is not None:
        why.update(reasons)
    return out_m, out_f, out_a


def window_sums(values_T: np.ndarray, window: int) -> np.ndarray:
    """Sums of every run of `window` consecutive entries (empty if the stream is shorter)."""
    c = np.concatenate([[0.0], np.cumsum(np.asarray(values_T, dtype=np.float64))])
    return c[window:] - c[:-window] if len(values_T) >= window else np.zeros(0)
