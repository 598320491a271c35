"""OryxForecaster: patch tokenizer, Oryx blocks and a quantile head, with a parallel forward and a streaming step.

Legend: B batch (series), L raw steps, T tokens, P patch length, C channels, D model dim,
Hz horizon steps, Q quantile levels.

Every token is a forecast origin: token n sees the stream up to the end of patch n and forecasts
the next Hz steps of every channel at Q quantile levels. Modes: 1 = attention, 0 = recurrence.
`step` reproduces `forward` token for token (tested), for every mode pattern, with every series of
a batch at its own position; `prefill` runs T patches per series in parallel from a `State` and
leaves the state T steps would.

The model is a plain module: it takes modes and never chooses them. Routing wraps it
(`routers.RoutedForecaster`), asking it for the token embedding through `embed_step`.
"""

from dataclasses import dataclass


import torch
import torch.nn.functional as F
from torch import nn

from oryx_ts.block import OryxBlock, RMSNorm
from oryx_ts.config import OryxConfig
from oryx_ts.kernels import dispatch
from oryx_ts.state import State, bounded_until
from oryx_ts.tokenizer import PatchTokenizer


def pinball_loss(pred_NQ: torch.Tensor, target_N: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Mean quantile (pinball) loss over the non-NaN targets; `pred` has a trailing quantile axis."""
    valid = ~torch.isnan(target_N)
    diff = torch.where(valid, target_N, 0.0)[..., None] - pred_NQ
    loss = torch.maximum(quantiles * diff, (quantiles - 1) * diff)
    return (loss * valid[..., None]).sum() / (valid.sum() * quantiles.numel()).clamp_min(1)


class QuantileHead(nn.Module):
    """Maps each token to Hz x C forecasts at Q quantile levels; quantiles cannot cross."""

    def __init__(self, d_model: int, horizon: int, channels: int, n_quantiles: int):
        super().__init__()
        self.shape = (horizon, channels, n_quantiles)
        self.proj = nn.Linear(d_model, horizon * channels * n_quantiles)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        raw = self.proj(x_BTD).view(*x_BTD.shape[:-1], *self.shape)
        Q = self.shape[-1]
        if Q == 1:
            return raw
        # a central level plus softplus gaps on either side keeps the levels ordered
        mid = Q // 2
        gaps = F.softplus(raw - 1.0) + 1e-4
        center = raw[..., mid : mid + 1]
        lo, hi = gaps[..., :mid], gaps[..., mid + 1 :]
        # a cumulative sum over one level is the level itself; skipping it matters on CUDA, where
        # flip/cumsum over an axis of length 1 costs more than the rest of a streaming step
        below = center - (lo if mid == 1 else lo.flip(-1).cumsum(-1).flip(-1))
        above = center + (hi if hi.shape[-1] == 1 else hi.cumsum(-1))
        return torch.cat([below, center, above], dim=-1)


@dataclass
class StepInput:
    """One patch per series as the model's step consumes it (from `OryxForecaster.embed_step`)."""

    patch_BPC: torch.Tensor
    tokens_B1D: torch.Tensor
    mean_BTC: torch.Tensor  # T = 1
    std_BTC: torch.Tensor
    stats_B3C: torch.Tensor  # the statistics after this patch


class OryxForecaster(nn.Module):
    """The Oryx multi-mixer forecaster for multivariate streams (pure module; no training logic)."""

    def __init__(self, config: OryxConfig):
        super().__init__()
        self.config = config
        b = config.block
        self.tokenizer = PatchTokenizer(config.tokenizer, b.d_model)
        self.blocks = nn.ModuleList([OryxBlock(b) for _ in range(b.n_layers)])
        self.norm = RMSNorm(b.d_model, b.norm_eps)
        self.head = QuantileHead(b.d_model, config.head.horizon, config.tokenizer.channels, len(config.head.quantiles))
        self.register_buffer("quantiles", torch.tensor(config.head.quantiles), persistent=False)

    # --- parallel -----------------------------------------------------------------------------

    def _modes(self, modes: torch.Tensor | None, B: int, T: int, device, *, check: bool = True) -> torch.Tensor:
        if modes is None:
            return torch.zeros(B, T, device=device)
        if not isinstance(modes, torch.Tensor):
            modes = torch.as_tensor(modes)
        if modes.dim() == 1 and modes.shape[0] == T:
            modes = modes.expand(B, T)
        if modes.shape != (B, T):
            raise ValueError(f"modes must have shape ({B}, {T}) (batch, tokens) or ({T},), got {tuple(modes.shape)}")
        modes = modes.to(device=device, dtype=torch.float32)
        if check and not ((modes >= 0) & (modes <= 1)).all():
            raise ValueError("modes must lie in [0, 1] (1 = attention, 0 = recurrence)")
        return modes

    @staticmethod
    def _series_modes(mode, B: int) -> torch.Tensor:
        """A step's modes as (B,): a scalar applies to every series."""
        mode = torch.as_tensor(mode)
        if mode.dim() == 0:
            return mode.expand(B)
        if mode.shape != (B,):
            raise ValueError(f"mode must be a scalar or have shape ({B},) (one per series), got {tuple(mode.shape)}")
        return mode

    def forward_normalized(self, x_BLC: torch.Tensor, modes: torch.Tensor | None = None):
        """Forecasts in normalized units. Returns `(pred_BTHzCQ, mean_BTC, std_BTC)`."""
        self.tokenizer.check_input(x_BLC)
        x_BTD, mean, std, _ = self.tokenizer(x_BLC)
        m_BT = self._modes(modes, x_BTD.shape[0], x_BTD.shape[1], x_BTD.device)
        b = self.config.block
        k_until_BT = bounded_until(m_BT, b.window, b.pinned) if b.retention == "bounded" else None
        for block in self.blocks:
            x_BTD = block(x_BTD, m_BT, k_until_BT=k_until_BT)
        return self.head(self.norm(x_BTD)), mean, std

    def forward(self, x_BLC: torch.Tensor, modes: torch.Tensor | None = None) -> torch.Tensor:
        """Forecasts of every token in data units, `(B, T, Hz, C, Q)`; `modes` (B, T) or (T,), default all-recurrent.

        Raises `ValueError` when `x_BLC` is not `(B, T * patch_len, channels)` or `modes` does not fit.
        """
        pred, mean, std = self.forward_normalized(x_BLC, modes)
        return self.tokenizer.denormalize(pred, mean, std)

    def embed(self, x_BLC: torch.Tensor, state: State | None = None) -> torch.Tensor:
        """The token embeddings `(B, T, D)` of whole streams from their start, or of streams continuing
        `state` (not changed): what a router reads."""
        self.tokenizer.check_input(x_BLC)
        return self.tokenizer(x_BLC, None if state is None else state.norm_stats_B3C)[0]

    @torch.no_grad()
    def prefill(
        self, x_BLC: torch.Tensor, modes: torch.Tensor | None = None, *, state: State | None = None, capacity: int = 256,
        parts=None,
    ) -> tuple[torch.Tensor, State]:
        """Consume T patches per series in one parallel pass; returns `(forecasts_BTHzCQ, state)` in data units.

        Equal to stepping every patch (`step`) from `state` (default: a new empty state, with
        `capacity` and `parts` as in `init_state`), within fp32 rounding (tested): the same
        forecasts, and the same state after it (token counts, normalization statistics, recurrent
        states, conv tails, KV cache and slots). Each series continues from its own position, so a
        long history can be replayed in chunks. A given `state` is updated in place and returned.
        `modes` (B, T) or (T,), default all-recurrent. Raises `ValueError` for an input, modes or
        state that do not fit, or `parts` given with a `state`.
        """
        self.tokenizer.check_input(x_BLC)
        B = x_BLC.shape[0]
        if state is None:
            state = self.init_state(B, capacity=capacity, device=x_BLC.device, parts=parts)
        elif parts is not None:
            raise ValueError("parts apply to a new state only: a given state keeps its own")
        else:
            self.check_state(state, B)
        x_BTD, mean, std, stats = self.tokenizer(x_BLC, state.norm_stats_B3C)
        m_BT = self._modes(modes, B, x_BTD.shape[1], x_BTD.device)
        b = self.config.block
        plan = state.plan_chunk(m_BT, b.window, b.pinned)
        for block, layer_state in zip(self.blocks, state.layers, strict=True):
            x_BTD = block.prefill(x_BTD, m_BT, layer_state, plan)
        state.norm_stats_B3C = stats
        state.n_tokens_B = state.n_tokens_B + x_BTD.shape[1]
        pred = self.head(self.norm(x_BTD))
        return self.tokenizer.denormalize(pred, mean, std), state

    def statistics(self, x_BLC: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean_BTC, std_BTC)` fp64: the causal normalization of every token of whole streams, or of
        streams continuing `state` (not changed)."""
        mean, std, _ = self.tokenizer.statistics(x_BLC, None if state is None else state.norm_stats_B3C)
        return mean, std

    def targets_normalized(self, x_BLC: torch.Tensor, mean_BTC: torch.Tensor, std_BTC: torch.Tensor) -> torch.Tensor:
        """For each token the next Hz steps of `x_BLC`, normalized like that token; NaN past the end."""
        P, Hz = self.config.tokenizer.patch_len, self.config.head.horizon
        B, L, C = x_BLC.shape
        padded = F.pad(x_BLC[:, P:].transpose(1, 2), (0, Hz), value=float("nan")).transpose(1, 2)
        windows_BTCHz = padded.unfold(1, Hz, P)[:, : L // P]
        return self.tokenizer.normalize(windows_BTCHz.transpose(2, 3), mean_BTC, std_BTC)

    def loss(self, x_BLC: torch.Tensor, modes: torch.Tensor | None = None) -> torch.Tensor:
        """Quantile loss of every token's forecast against the later steps of `x_BLC` (normalized units)."""
        pred, mean, std = self.forward_normalized(x_BLC, modes)
        target = self.targets_normalized(x_BLC, mean, std)
        return pinball_loss(pred, target, self.quantiles)

    # --- streaming ----------------------------------------------------------------------------

    def init_state(self, batch_size: int, *, capacity: int = 256, device=None, parts=None, state_dtype: torch.dtype | None = None) -> State:
        """An empty state for `batch_size` series on the model's device; see `State.allocate` (and its
        `state_dtype`: bf16 or fp16 recurrent state and KV cache)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        p = next(self.parameters())
        return State.allocate(self.config, batch_size, device=device or p.device, dtype=p.dtype, capacity=capacity, parts=parts,
                              state_dtype=state_dtype)

    def check_state(self, state: State, batch_size: int) -> None:
        """Raise `ValueError` when `state` cannot be stepped by this model with `batch_size` series."""
        if state.batch_size != batch_size:
            raise ValueError(f"state holds {state.batch_size} series, patch has {batch_size}")
        b = self.config.block
        expected_rec = (batch_size, b.n_heads, b.head_dim_k, b.head_dim_v)
        if len(state.layers) != len(self.blocks) or tuple(state.layers[0].rec_BHKV.shape) != expected_rec:
            raise ValueError(
                f"state does not fit this model: {len(state.layers)} layers with recurrent state "
                f"{tuple(state.layers[0].rec_BHKV.shape)}, expected {len(self.blocks)} layers with {expected_rec}"
            )
        if (b.retention == "bounded") != state.bounded:
            raise ValueError(f"state was made for another retention policy than the model's {b.retention!r}")

    @torch.no_grad()
    def embed_step(self, patch_BPC: torch.Tensor, state: State) -> "StepInput":
        """The token of one patch per series with the statistics it will be normalized by; `state` is not changed.

        Raises `ValueError` for a patch of the wrong shape or a state that does not fit. On CUDA the
        values are not checked for +-inf (that check would wait for the device): check them first.
        """
        self.tokenizer.check_input(patch_BPC, step=True, finite=patch_BPC.device.type != "cuda")
        self.check_state(state, patch_BPC.shape[0])
        x_B1D, mean, std, stats = self.tokenizer(patch_BPC, state.norm_stats_B3C)
        return StepInput(patch_BPC, x_B1D, mean, std, stats)

    @torch.no_grad()
    def step(
        self, patch_BPC: torch.Tensor, state: State, modes: torch.Tensor | float | None = None, *, embedded: "StepInput | None" = None
    ) -> tuple[torch.Tensor, State]:
        """Consume one patch per series; returns `(forecast_BHzCQ, state)` in data units.

        Every series advances from its own position (`state.n_tokens_B`). `state` is updated in
        place and returned. `modes` (B,) per series or a scalar for all, 1 = attention, default 0.
        `embedded` is `embed_step(patch_BPC, state)` when the caller already has it. Raises
        `ValueError` for a patch of the wrong shape, a state that does not fit, or bad modes.
        On CUDA the step does not check patch values (+-inf) or mode values (outside [0, 1]), only
        shapes: under bounded retention it never waits for the device (under `all`, growing the
        cache reads the longest series' length).
        """
        if embedded is None or embedded.patch_BPC is not patch_BPC:
            embedded = self.embed_step(patch_BPC, state)
        B = patch_BPC.shape[0]
        on_host = patch_BPC.device.type != "cuda"
        m_B = self._modes(None if modes is None else self._series_modes(modes, B)[:, None], B, 1, patch_BPC.device, check=on_host)[:, 0]
        b = self.config.block
        plan = state.plan_step(m_B, b.window, b.pinned)
        x_B1D, pos_B = embedded.tokens_B1D, state.n_tokens_B
        # the general path's one host sync: which series compute attention; a compiled step computes
        # it for every series instead (a mode of 0 then takes the recurrent output exactly), and the
        # fused CUDA step reads the modes on the device
        fused = dispatch.use_layer_step(x_B1D, b.head_dim_k, b.head_dim_v)
        att_rows = None if torch.compiler.is_compiling() or fused else (m_B != 0).nonzero().squeeze(1)
        # each block hands the next its normed input: a residual add and the norm after it are one launch on CUDA
        h_B1D = None
        norms = [blk.mixer_norm for blk in self.blocks[1:]] + [self.norm]
        for block, layer_state, norm in zip(self.blocks, state.layers, norms, strict=True):
            x_B1D, h_B1D = block.step(x_B1D, m_B, layer_state, pos_B, plan, att_rows, normed_B1D=h_B1D, next_norm=norm)
        state.norm_stats_B3C = embedded.stats_B3C
        state.n_tokens_B = state.n_tokens_B + 1
        pred = self.head(h_B1D)
        return self.tokenizer.denormalize(pred, embedded.mean_BTC, embedded.std_BTC)[:, 0], state

    def normalization(self, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean_BC, std_BC)` (fp64) that the latest token of each series was normalized with."""
        return self.tokenizer.mean_std(state.norm_stats_B3C)

    # --- introspection ------------------------------------------------------------------------

    def shared_parameter_fraction(self) -> float:
        """Fraction of block parameters shared by both mixers (everything but their queries and gates)."""
        totals = {"attention": 0, "linear": 0, "shared": 0}
        for block in self.blocks:
            for part, n in block.mode_specific_parameters().items():
                totals[part] += n
        return totals["shared"] / sum(totals.values())
