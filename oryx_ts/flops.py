"""The single cost model of oryx_ts: FLOPs of one token in each mode, given the model shape and the retained cache.

Counting follows `torch.utils.flop_counter.FlopCounterMode`: a matrix product of (m x k) by (k x n)
costs 2mkn, a depthwise convolution 2 x outputs x width. On top of that it counts the elementwise
work that grows with the model's state and is not negligible there: the recurrent state update
(decay and rank-one write, 3 FLOPs per state entry; the delta rule reads the state once more) and
the softmax over the retained keys (5 FLOPs per logit). Norms, gates and activations are left out;
they are a few FLOPs per model-dim entry and the tests bound the whole model within 5% of the
counter.

A token in recurrent mode (0) pays the shared projections, convolutions, recurrent update and MLP
of every layer; a token in attention mode (1) pays the same plus the attention query and the scores
and values over the `S` retained keys (itself included). Both states are advanced whatever the mode,
so the attention surcharge per layer is the query projection plus `(2 K + 2 V + 5) H S` FLOPs.

Legend: S retained keys, D model dim, H heads, K/V head dims, W conv width, P patch length,
C channels, Hz horizon, Q quantile levels, N token position (0-based).
"""

from dataclasses import dataclass

import numpy as np

from oryx_ts.config import BlockConfig, OryxConfig

ATTENTION, RECURRENT = 1, 0


def retained_keys(block: BlockConfig, position: int | np.ndarray) -> int | np.ndarray:
    """Keys an attention query at token `position` (0-based) sees, itself included.

    Retention `all` keeps every token; `bounded` keeps at most `window + pinned` of them (the count
    used here; the pinned slots fill only as attention tokens leave the window, and the torch path
    scores every slot, so it is exact once the slots are full and a bound on the keys seen before).
    """
    n = np.asarray(position) + 1
    if block.retention == "bounded":
        n = np.minimum(n, block.window + block.pinned)
    return int(n) if np.ndim(n) == 0 else n


def layer_flops(block: BlockConfig, mode: int, cache_len: int) -> dict[str, int]:
    """FLOPs of one token in one Oryx layer, by term; `cache_len` is the retained keys S (itself included).

    Raises `ValueError` for a mode other than 0/1 or a cache length below 1.
    """
    if mode not in (0, 1):
        raise ValueError(f"mode must be 0 (recurrent) or 1 (attention), got {mode!r}")
    if cache_len < 1:
        raise ValueError(f"cache_len must be >= 1 (the token's own key), got {cache_len}")
    D, H, K, V, W = block.d_model, block.n_heads, block.head_dim_k, block.head_dim_v, block.conv_size
    gates = 2 * D * H * 2  # gdn: decay and beta; mamba2: dt (and the D skip, elementwise)
    if block.mixer == "mamba2":
        gates = 2 * D * H
    terms = {
        "kv_proj": 2 * D * H * (K + V),
        "lin_q_proj": 2 * D * H * K,
        "gates": gates,
        "conv": 2 * W * H * (2 * K + V),
        "recurrent": 2 * H * K * V * (2 if block.mixer == "gdn" else 1),  # state reads (the delta rule reads twice)
        "recurrent_update": 3 * H * K * V,  # elementwise decay and rank-one write
        "z_o_proj": 2 * D * H * V * 2,
        "mlp": 3 * 2 * D * block.mlp_hidden,
        "att_q_proj": 0,
        "attention": 0,
        "softmax": 0,
    }
    if mode == ATTENTION:
        terms["att_q_proj"] = 2 * D * H * K
        terms["attention"] = 2 * H * cache_len * (K + V)
        terms["softmax"] = 5 * H * cache_len
    return terms


ELEMENTWISE_TERMS = ("recurrent_update", "softmax")  # terms the FLOP counter does not see


def token_flops(config: OryxConfig, mode: int, cache_len: int) -> int:
    """FLOPs of one token through the whole model (embedding, every layer, head) at `cache_len` retained keys."""
    t, b, h = config.tokenizer, config.block, config.head
    embed = 2 * (2 * t.patch_len * t.channels) * b.d_model
    head = 2 * b.d_model * h.horizon * t.channels * len(h.quantiles)
    return embed + head + b.n_layers * sum(layer_flops(b, mode, cache_len).values())


@dataclass(frozen=True)
class ModeCosts:
    """Per-token FLOPs of both modes at positions `n0 .. n0 + T - 1`: `recurrent_T`, `attention_T` (float64)."""

    recurrent_T: np.ndarray
    attention_T: np.ndarray

    @property
    def surcharge_T(self) -> np.ndarray:
        """What attention costs on top of recurrence at each position."""
        return self.attention_T - self.recurrent_T


def mode_costs(config: OryxConfig, n0: int, T: int) -> ModeCosts:
    """Per-token FLOPs of both modes for tokens at positions `n0 .. n0 + T - 1` (vectorized, closed form)."""
    return mode_costs_at(config, np.arange(n0, n0 + T))


def mode_costs_at(config: OryxConfig, positions: np.ndarray) -> ModeCosts:
    """Per-token FLOPs of both modes at any array of token positions (same shape out)."""
    positions = np.asarray(positions)
    S = np.asarray(retained_keys(config.block, positions), dtype=np.float64)
    rec = float(token_flops(config, RECURRENT, 1))
    b = config.block
    att_fixed = b.n_layers * 2 * b.d_model * b.n_heads * b.head_dim_k
    att_per_key = b.n_layers * b.n_heads * (2 * b.head_dim_k + 2 * b.head_dim_v + 5)
    return ModeCosts(np.full(positions.shape, rec), rec + att_fixed + att_per_key * S)
