"""PatchTokenizer: a multivariate stream becomes one token per patch of P steps.

Legend: B batch, L raw steps, T tokens (patches), P patch length, C channels, D model dim.

Causal normalization: each channel keeps exponentially decayed sums (count, sum, sum of squares)
of its observed values, updated once per patch. Token n is normalized with the statistics after
patch n, so they depend only on data up to patch n. `forward` and `step` share one update
function, so training, backtests and streaming see identical inputs. NaN marks a missing value:
it is left out of the statistics, fed as 0 and flagged in a mask that is an input feature.
"""

import torch
from torch import nn

from oryx_ts.config import TokenizerConfig


def _stats_update(stats_B3C: torch.Tensor, patch_BPC: torch.Tensor, decay: float) -> torch.Tensor:
    """Fold one patch into the decayed (count, sum, sum of squares); fp64, NaN-aware."""
    x = patch_BPC.to(torch.float64)
    observed = ~torch.isnan(x)
    x0 = torch.where(observed, x, 0.0)
    sums_B3C = torch.stack([observed.sum(1).to(torch.float64), x0.sum(1), (x0 * x0).sum(1)], dim=1)
    return decay * stats_B3C + sums_B3C


def _mean_std(stats_B3C: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    count, s1, s2 = stats_B3C.unbind(1)
    seen = count > 0
    safe = count.clamp_min(1e-12)
    mean = torch.where(seen, s1 / safe, 0.0)
    var = torch.where(seen, (s2 / safe - mean * mean).clamp_min(0.0), 1.0)
    return mean, (var + eps).sqrt()


SCAN_CHUNK = 64  # tokens per chunk of the parallel statistics scan


class PatchTokenizer(nn.Module):
    """Patches, causal normalization, missing mask, linear embedding; inverse transform for forecasts."""

    def __init__(self, config: TokenizerConfig, d_model: int):
        super().__init__()
        self.config = config
        P, C = config.patch_len, config.channels
        self.embed = nn.Linear(2 * P * C, d_model)

    def check_input(self, x_BLC: torch.Tensor, *, step: bool = False, finite: bool = True) -> None:
        """Raise `ValueError` naming the expected shape when `x_BLC` does not fit this tokenizer.

        `finite=False` skips the check for +-inf, the one check that reads the values (on a GPU it
        waits for the device).
        """
        P, C = self.config.patch_len, self.config.channels
        expected = f"(batch, {P}, {C})" if step else f"(batch, length multiple of {P}, {C})"
        if not isinstance(x_BLC, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of shape {expected}, got {type(x_BLC).__name__}")
        if x_BLC.dim() != 3 or x_BLC.shape[-1] != C or (step and x_BLC.shape[1] != P):
            raise ValueError(f"expected input of shape {expected}, got {tuple(x_BLC.shape)}")
        if x_BLC.shape[1] == 0 or x_BLC.shape[1] % P:
            raise ValueError(f"expected input of shape {expected}, got length {x_BLC.shape[1]}")
        if not x_BLC.is_floating_point():
            raise TypeError(f"expected a floating-point tensor, got {x_BLC.dtype}")
        if finite and torch.isinf(x_BLC).any():
            raise ValueError("input holds +-inf; mark missing values with NaN instead")

    def init_stats(self, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.zeros(batch_size, 3, self.config.channels, dtype=torch.float64, device=device)

    def mean_std(self, stats_B3C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean_BC, std_BC)` fp64 from decayed statistics (what a token after them is normalized with)."""
        return _mean_std(stats_B3C, self.config.norm_eps)

    def statistics(self, x_BLC: torch.Tensor, stats_B3C: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token normalization statistics. Returns `(mean_BTC, std_BTC, final_stats_B3C)` (fp64).

        The decayed sums are the recurrence `s_n = decay * s_(n-1) + sums(patch n)` that `step`
        runs, evaluated in chunks of `SCAN_CHUNK` tokens as a small triangular matrix product (fp64:
        it agrees with the step's recurrence to rounding).
        """
        cfg = self.config
        B, L, C = x_BLC.shape
        T = L // cfg.patch_len
        x = x_BLC.reshape(B, T, cfg.patch_len, C).to(torch.float64)
        observed = ~torch.isnan(x)
        x0 = torch.where(observed, x, 0.0)
        sums_BT3C = torch.stack([observed.sum(2).to(torch.float64), x0.sum(2), (x0 * x0).sum(2)], dim=2)
        stats = self.init_stats(B, x_BLC.device) if stats_B3C is None else stats_B3C
        c = min(SCAN_CHUNK, T)
        i = torch.arange(c, device=x_BLC.device, dtype=torch.float64)
        lower = torch.tril(cfg.norm_decay ** (i[:, None] - i[None, :]).clamp_min(0))  # d^(i-k) for k <= i
        carry = cfg.norm_decay ** (i + 1)
        out = []
        for n0 in range(0, T, c):
            chunk = sums_BT3C[:, n0 : n0 + c]
            n = chunk.shape[1]
            within = torch.einsum("ik,bkjc->bijc", lower[:n, :n], chunk)
            states = within + carry[:n, None, None] * stats[:, None]
            out.append(states)
            stats = states[:, -1]
        all_BT3C = torch.cat(out, 1)
        mean, std = _mean_std(all_BT3C.reshape(B * T, 3, C), cfg.norm_eps)
        return mean.reshape(B, T, C), std.reshape(B, T, C), stats

    def normalize(self, x_BTXC: torch.Tensor, mean_BTC: torch.Tensor, std_BTC: torch.Tensor) -> torch.Tensor:
        """Scale raw values (any X steps per token) with each token's statistics; NaN stays NaN."""
        z = (x_BTXC.to(torch.float64) - mean_BTC[:, :, None]) / std_BTC[:, :, None]
        return z.clamp(-self.config.clip, self.config.clip).to(x_BTXC.dtype)

    def denormalize(self, y_BTHCQ: torch.Tensor, mean_BTC: torch.Tensor, std_BTC: torch.Tensor) -> torch.Tensor:
        """Forecasts in normalized units back to data units."""
        std = std_BTC[:, :, None, :, None].to(y_BTHCQ.dtype)
        mean = mean_BTC[:, :, None, :, None].to(y_BTHCQ.dtype)
        return y_BTHCQ * std + mean

    def forward(self, x_BLC: torch.Tensor, stats_B3C: torch.Tensor | None = None):
        """Embed a stream. Returns `(tokens_BTD, mean_BTC, std_BTC, final_stats_B3C)`."""
        cfg = self.config
        B, L, C = x_BLC.shape
        T = L // cfg.patch_len
        mean, std, stats = self.statistics(x_BLC, stats_B3C)
        patches_BTPC = x_BLC.reshape(B, T, cfg.patch_len, C)
        z = self.normalize(patches_BTPC, mean, std)
        observed = ~torch.isnan(z)
        features = torch.cat([torch.where(observed, z, 0.0), observed.to(z.dtype)], dim=-1)
        tokens_BTD = self.embed(features.reshape(B, T, -1).to(self.embed.weight.dtype))
        return tokens_BTD, mean, std, stats
