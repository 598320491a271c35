"""Causal surprise features of a token: how badly the forecast made for its patch by the previous token missed.

Legend: B series, T tokens, P patch length, Pf forecast steps that fall in the next patch
(min(P, horizon)), C channels, Q quantile levels, F features.

Token n sees patch n and the forecast that token n-1 made for it (the first Pf steps of its
horizon). Errors are measured against that forecast's own spread (half the outer quantile
interval), so they are free of units. Features, in order:
    0  log1p of the mean error over observed steps and channels
    1  log1p of the largest per-channel mean error
    2  share of observed values outside the outer quantile interval
    3  feature 0 minus its running mean over earlier tokens (the trend; EMA with `decay`)
    4  share of missing values in the patch
    5  dispersion: log of the spread of step-to-step changes within the patch (std of first
       differences) over the forecast's spread, largest channel (variance bursts, spikes)
    6  flatness: minus the same log ratio, flattest channel (a stuck sensor: changes vanish)
Features 5 and 6 read only channels with at least two observed differences (0 when none) and are
floored at log(1e-3) per channel, so an exactly constant channel gives 6.9, not infinity.
The first token of a stream has no earlier forecast: its features 0-3, 5 and 6 are zero. The same function
serves streaming (T = 1), routed forwards and router training, so all three see the same inputs.
"""

import math

import torch

N_FEATURES = 7
NOVELTY_FEATURES = (1, 5, 6)  # what `novelty_scores` combines: the worst channel's error, dispersion, flatness


def surprise_features(
    patch_BTPC: torch.Tensor,
    prev_forecast_BTPCQ: torch.Tensor,
    has_prev_T: torch.Tensor,
    ema_B: torch.Tensor,
    *,
    median_index: int,
    decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features `(B, T, F)` float32 and the final EMA `(B,)` float64.

    `prev_forecast_BTPCQ[:, n]` is the forecast made by token n-1 (anything where `has_prev_T[n]` is False);
    `has_prev_T` may also be `(B, T)`, for series at different positions.
    """
    Pf = prev_forecast_BTPCQ.shape[2]
    x = patch_BTPC[:, :, :Pf].to(torch.float64)
    f = prev_forecast_BTPCQ.to(torch.float64)
    med, lo, hi = f[..., median_index], f[..., 0], f[..., -1]
    width = (hi - lo) / 2 + 1e-6 + 1e-3 * med.abs()
    observed = ~torch.isnan(x)
    x0 = torch.where(observed, x, med)
    z = (x0 - med).abs() / width
    n_obs_BTC = observed.sum(2).clamp_min(1)
    z_BTC = (z * observed).sum(2) / n_obs_BTC
    n_obs = observed.sum((2, 3)).clamp_min(1)
    mean_z = (z * observed).sum((2, 3)) / n_obs
    outside = (((x0 < lo) | (x0 > hi)) & observed).sum((2, 3)) / n_obs
    f0 = torch.log1p(mean_z)
    f1 = torch.log1p(z_BTC.amax(-1))
    prev = has_prev_T.to(torch.bool).to(x.device)
    prev = prev[None, :] if prev.dim() == 1 else prev
    f0, f1, outside = (torch.where(prev, t, 0.0) for t in (f0, f1, outside))
    trend = torch.empty_like(f0)
    ema = ema_B.to(torch.float64)
    for n in range(f0.shape[1]):
        trend[:, n] = torch.where(prev[:, n], f0[:, n] - ema, 0.0)
        ema = torch.where(prev[:, n], decay * ema + (1 - decay) * f0[:, n], ema)
    missing = torch.isnan(patch_BTPC).to(torch.float64).mean((2, 3))
    disp, flat = _dispersion(x, width)
    disp, flat = (torch.where(prev, t, 0.0) for t in (disp, flat))
    feats = torch.stack([f0, f1, outside, trend, missing, disp, flat], dim=-1)
    return feats.to(torch.float32), ema


def _dispersion(x_BTPC: torch.Tensor, width_BTPC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features 5 and 6 `(B, T)` float64 from the patch (NaN = missing) and the forecast's half-width."""
    d = x_BTPC.diff(dim=2)
    ok = ~torch.isnan(d)
    n = ok.sum(2)
    d0 = torch.where(ok, d, 0.0)
    mean = d0.sum(2) / n.clamp_min(1)
    var = (torch.where(ok, d0 - mean[:, :, None], 0.0) ** 2).sum(2) / (n - 1).clamp_min(1)
    width_BTC = width_BTPC.mean(2)
    ratio = torch.log((var.sqrt() + 1e-3 * width_BTC) / width_BTC).clamp(max=10.0)
    valid = n >= 2
    disp = torch.where(valid, ratio, -torch.inf).amax(-1)
    flat = -torch.where(valid, ratio, torch.inf).amin(-1)
    any_valid = valid.any(-1)
    return torch.where(any_valid, disp, 0.0), torch.where(any_valid, flat, 0.0)


def novelty_scores(surprise_BTF: torch.Tensor, has_prev_T: torch.Tensor) -> torch.Tensor:
    """A label-free score `(B, T)` of how unusual each token's own patch is within its window.

    Each of the `NOVELTY_FEATURES` is standardized per series over the tokens that have an
    earlier forecast (mean 0, std 1); the score is their maximum, so a token stands out when its
    error, its dispersion or its flatness does. Tokens without an earlier forecast score -inf.
    The statistics read the whole window: for training targets only.
    """
    valid = has_prev_T.to(torch.bool)[None, :, None]
    f = surprise_BTF[..., list(NOVELTY_FEATURES)].to(torch.float64)
    n = valid.sum(1, keepdim=True).clamp_min(1)
    mean = torch.where(valid, f, 0.0).sum(1, keepdim=True) / n
    std = (torch.where(valid, f - mean, 0.0) ** 2).sum(1, keepdim=True).div(n).sqrt()
    z = (f - mean) / (std + 1e-6)
    return torch.where(valid[..., 0], z.amax(-1), -torch.inf)


def mark_lookahead(hot_BT: torch.Tensor, lookahead: int) -> torch.Tensor:
    """`(B, T)` float32: 1 at n when any of tokens n .. n + lookahead of its row is hot (nonzero)."""
    B = hot_BT.shape[0]
    padded = torch.cat([hot_BT.float(), hot_BT.new_zeros(B, lookahead, dtype=torch.float32)], dim=1)
    return (padded.unfold(1, lookahead + 1, 1).amax(-1) > 0).float()


def surprise_targets(surprise_BT: torch.Tensor, has_prev_T: torch.Tensor, *, fraction: float, lookahead: int = 0) -> torch.Tensor:
    """Label-free router targets `(B, T)` float32 in {0, 1}: where a window of the stream is most surprising.

    `surprise_BT` scores each token's own patch (for instance feature 1 of `surprise_features`
    under the all-recurrent forecasts); tokens without an earlier forecast (`has_prev_T` False)
    are never surprising. A token is *hot* when its score is among the `ceil(fraction * n)`
    largest of its series' n scored tokens (ties at the threshold count as hot); it is a positive
    when it or one of the next `lookahead` tokens is hot. The targets read the whole window, the
    future included, so they are for training only; a router meets them from causal features.
    Raises `ValueError` for a fraction outside (0, 1] or a negative lookahead.
    """
    if not 0.0 < fraction <= 1.0 or lookahead < 0:
        raise ValueError(f"need fraction in (0, 1] and lookahead >= 0, got {fraction}, {lookahead}")
    valid_T = has_prev_T.to(torch.bool)
    n = int(valid_T.sum())
    B, T = surprise_BT.shape
    if n == 0:
        return surprise_BT.new_zeros(B, T, dtype=torch.float32)
    s = torch.where(valid_T[None, :], surprise_BT.to(torch.float64), float("-inf"))
    k = math.ceil(fraction * n)
    threshold_B = s.topk(k, dim=1).values[:, -1:]
    return mark_lookahead((s >= threshold_B) & valid_T[None, :], lookahead)
