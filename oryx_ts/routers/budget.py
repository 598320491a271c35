"""The expected-FLOPs budget and the controller that turns router scores into hard modes online.

Legend: B series, W window (tokens), N token position.

A `Budget` gives each token position an allowance `a_N` in FLOPs (`oryx_ts.flops` is the cost
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
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from oryx_ts.config import OryxConfig
from oryx_ts.flops import mode_costs

TAU_MIN = 1e-6  # scores of 0 never pass; scores of 1 always reach the threshold
SCORE_EMA = 0.01  # weight of a new score in the running mean and deviation
Z_MAX = 10.0


@dataclass(frozen=True, kw_only=True)
class Budget:
    """A mean FLOPs-per-token target and how the controller holds it.

    Give exactly one of `fraction` or `flops`:
        fraction: with `of="surcharge"` (default) the token allowance is the recurrent cost plus this
            share of the attention surcharge at that position (0 = all-recurrent, 1 = all-attention);
            with `of="attention"` it is this share of the all-attention cost, which must cover the
            recurrent cost at every position (small models at short caches cannot go below it).
        flops: an absolute allowance per token (must cover the recurrent cost).
    window: W, the length of the sliding windows the guarantee holds over.
    slack: the guarantee is `spent <= (1 + slack) * allowance` over every window.
    reserve: share of a window's surcharge allowance that only spikes may spend.
    spike_z: a score is a spike when it lies this many deviations above the running mean score.
    threshold_lr: step of the adaptive threshold, in deviations of the scores.
    """

    fraction: float | None = None
    flops: float | None = None
    of: Literal["surcharge", "attention"] = "surcharge"
    window: int = 128
    slack: float = 0.0
    reserve: float = 0.3
    spike_z: float = 2.0
    threshold_lr: float = 0.05

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.flops is None):
            raise ValueError(f"give exactly one of Budget.fraction or Budget.flops, got fraction={self.fraction}, flops={self.flops}")
        if self.fraction is not None and not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"Budget.fraction must be in [0, 1], got {self.fraction}")
        if self.flops is not None and not self.flops > 0:
            raise ValueError(f"Budget.flops must be > 0, got {self.flops}")
        if self.of not in ("surcharge", "attention"):
            raise ValueError(f"Budget.of must be 'surcharge' or 'attention', got {self.of!r}")
        if self.window < 1:
            raise ValueError(f"Budget.window must be >= 1, got {self.window}")
        if self.slack < 0 or not 0.0 <= self.reserve <= 1.0 or self.threshold_lr < 0:
            raise ValueError(f"need slack >= 0, reserve in [0, 1], threshold_lr >= 0; got {self.slack}, {self.reserve}, {self.threshold_lr}")

    def allowance(self, config: OryxConfig, n0: int, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(recurrent_T, attention_T, allowance_T)` FLOPs for positions `n0 .. n0 + T - 1` (float64).

        Raises `ValueError` when the allowance does not cover the recurrent cost somewhere.
        """
        costs = mode_costs(config, n0, T)
        rec, att = costs.recurrent_T, costs.attention_T
        if self.flops is not None:
            allow = np.full(T, float(self.flops))
        elif self.of == "surcharge":
            allow = rec + self.fraction * (att - rec)
        else:
            allow = self.fraction * att
        if T and (allow < rec * (1 - 1e-12)).any():
            n = n0 + int(np.argmax(allow < rec))
            raise ValueError(
                f"budget allows {allow[n - n0]:.0f} FLOPs at token {n}, below the all-recurrent cost {rec[n - n0]:.0f}; "
                "raise it or give it as a fraction of the attention surcharge"
            )
        return rec, att, allow


@dataclass
class ControllerState:
    """Per-series controller state: excess of the last W-1 tokens (oldest first) and the threshold's statistics."""

    excess_BW: torch.Tensor  # float64 (B, W-1)
    z_B: torch.Tensor  # float64 (B,), threshold in deviations above the mean score
    score_mean_B: torch.Tensor  # float64 (B,), EMA without bias correction
    score_dev_B: torch.Tensor  # float64 (B,), EMA of |score - mean| without bias correction

    FIELDS = ("excess_BW", "z_B", "score_mean_B", "score_dev_B")

    @classmethod
    def init(cls, batch_size: int, window: int, device=None) -> "ControllerState":
        """Empty history; the threshold starts one deviation above the mean score."""
        zeros = lambda: torch.zeros(batch_size, dtype=torch.float64, device=device)  # noqa: E731
        return cls(
            excess_BW=torch.zeros(batch_size, max(window - 1, 0), dtype=torch.float64, device=device),
            z_B=zeros() + 1.0, score_mean_B=zeros(), score_dev_B=zeros(),
        )


def controller_step(
    scores_B: torch.Tensor, st: ControllerState, budget: Budget, config: OryxConfig, position: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decide the modes of the token at `position` for every series and advance `st` in place.

    Returns `(modes_B, flops_B, allowance_B)`: 1 = attention, the FLOPs that token spends, and its allowance.
    """
    W = budget.window
    if st.excess_BW.shape[1] != max(W - 1, 0):
        raise ValueError(f"controller state holds a window of {st.excess_BW.shape[1] + 1} tokens, the budget asks for {W}")
    rec, att, allow = (torch.as_tensor(a, dtype=torch.float64) for a in budget.allowance(config, position, W))
    k = 1 + budget.slack
    scores = scores_B.detach().to(torch.float64).cpu()
    past = st.excess_BW.cpu()
    B = scores.shape[0]
    # worst window through this token: L past tokens (newest first), this one, W-1-L future recurrent ones
    past_L = torch.cat([past.new_zeros(B, 1), past.flip(1).cumsum(1)], dim=1)  # (B, W)
    past_L[:, position + 1 :] = float("-inf")  # windows that would start before the stream are not windows
    fut = torch.cat([rec.new_zeros(1), (rec[1:] - k * allow[1:]).cumsum(0)])  # (W,) future prefix sums
    worst = (past_L + fut.flip(0)[None, :]).amax(1) + (att[0] - k * allow[0])
    scale = float(k * allow[: W].sum())
    eps = 1e-12 * scale
    surcharge_allow = float(W * (allow[0] - rec[0]))
    fits_spike = worst <= eps
    fits_ordinary = worst <= -budget.reserve * surcharge_allow + eps
    dev_ = st.score_mean_B.device
    correction = 1.0 - (1.0 - SCORE_EMA) ** (position + 1)  # tokens seen, this one included
    mean = st.score_mean_B.cpu() + SCORE_EMA * (scores - st.score_mean_B.cpu())
    dev = st.score_dev_B.cpu() + SCORE_EMA * ((scores - mean / correction).abs() - st.score_dev_B.cpu())
    z = st.z_B.cpu()
    tau = (mean / correction + z * (dev / correction + 1e-9)).clamp(TAU_MIN, 1.0)
    spike = (mean / correction + budget.spike_z * (dev / correction + 1e-9)).clamp(TAU_MIN, 1.0)
    modes = ((scores >= tau) & fits_ordinary) | ((scores >= spike) & fits_spike)
    m = modes.to(torch.float64)
    flops = rec[0] + m * (att[0] - rec[0])
    rate = float(((allow[0] - rec[0]) / (att[0] - rec[0])).clamp(0.0, 1.0))
    st.z_B = (z + budget.threshold_lr * (m - rate)).clamp(-Z_MAX, Z_MAX).to(dev_)
    st.score_mean_B, st.score_dev_B = mean.to(dev_), dev.to(dev_)
    if W > 1:
        st.excess_BW = torch.cat([past[:, 1:], (flops - k * allow[0])[:, None]], dim=1).to(st.excess_BW.device)
    return m.to(torch.float32), flops, allow[0].expand(B).clone()


def window_sums(values_T: np.ndarray, window: int) -> np.ndarray:
    """Sums of every run of `window` consecutive entries (empty if the stream is shorter)."""
    c = np.concatenate([[0.0], np.cumsum(np.asarray(values_T, dtype=np.float64))])
    return c[window:] - c[:-window] if len(values_T) >= window else np.zeros(0)
