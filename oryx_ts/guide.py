"""Guided attention: an auxiliary loss that teaches attention heads to look the past up.

A forecaster's content look-up (attend to the earlier play of a repeating pattern, read what came
next there) forms late and unreliably from the forecast loss alone: a small model trained on a
recall curriculum reaches it as a sudden phase change after thousands of steps, or not at all
(docs/RESULTS.md, "Look-up"). On the curriculum it is known where each repeat's answer lies, so a
few heads can be told: for a token inside a repeat, the key `ahead` tokens after its match in the
play before (the token whose values continue it). `guide_targets` turns a curriculum's plays
(`datasets.recall.recall_plays`) into that key per token; `guided_loss` is the cross-entropy of
the guided heads' attention (every token a query over the causal past, the block's own logits:
normalized keys and queries, RoPE when the block has it, the learned temperature) towards it,
averaged over the layers. `Guide` is what `train.fit` takes: the targets, the loss's weight, how
many heads of each layer, and for how many steps.

Only the guided heads' attention is shaped; the forecast loss still decides what the model reads
from the key it finds. Legend: B windows, T tokens, H heads, K key dims.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from oryx_ts.datasets.labels import LabelWindow
from oryx_ts.kernels.attention.naive import routed_inputs

__all__ = ["Guide", "attention_logits", "guide_targets", "guided_loss", "mixer_inputs", "window_targets"]


@dataclass(frozen=True)
class Guide:
    """Guided attention for `train.fit`: `targets_T[t]` is the stream token that token `t` (on the
    patch grid from step 0) should attend to, -1 for none (`guide_targets`); `weight` scales the
    loss added to the forecast loss; the first `heads` attention heads of every layer are guided;
    `steps`: only the first that many optimizer steps (None: all)."""

    targets_T: np.ndarray
    weight: float = 1.0
    heads: int = 1
    steps: int | None = None

    def __post_init__(self) -> None:
        if np.ndim(self.targets_T) != 1:
            raise ValueError(f"targets_T must be one-dimensional, got shape {np.shape(self.targets_T)}")
        if not self.weight > 0 or self.heads < 1 or (self.steps is not None and self.steps < 0):
            raise ValueError(f"need weight > 0, heads >= 1 and steps >= 0, got {self.weight}, {self.heads}, {self.steps}")

    def active(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) is guided."""
        return self.steps is None or step <= self.steps


def guide_targets(plays: Sequence[Sequence[LabelWindow]], length: int, patch_len: int, *, ahead: int = 2) -> np.ndarray:
    """`(ceil(length / patch_len),)` int64: per token of a stream of `length` steps, the key token it should
    attend to, or -1.

    `plays`: per block, its plays in order (`recall_plays`). For every play after a block's first, at
    lag `L` tokens behind it (its start minus the play before's, rounded to whole tokens: a repeat
    need not start on the patch grid where its earlier play did), each token whose patch lies
    inside the play, up to `ahead` tokens before its end, gets `t - L + ahead`: the token of the
    earlier play `ahead` patches after its match (the one that overlaps it most), which shows what
    comes next. A lag shorter than `ahead` tokens (or than one) gives no targets.
    """
    if patch_len < 1 or ahead < 0:
        raise ValueError(f"need patch_len >= 1 and ahead >= 0, got {patch_len}, {ahead}")
    targets = np.full(-(-length // patch_len), -1, np.int64)
    for block in plays:
        for before, play in zip(block, block[1:]):
            lag = (2 * (play.start - before.start) + patch_len) // (2 * patch_len)  # rounded, halves up
            if lag < max(ahead, 1):
                continue
            first, stop = -(-play.start // patch_len), min(play.end // patch_len - ahead, len(targets))
            if stop > first:
                t = np.arange(first, stop)
                targets[t] = t - lag + ahead
    return targets


def window_targets(targets_T: np.ndarray, starts: torch.Tensor, patch_len: int, n_tokens: int) -> torch.Tensor:
    """`(B, n_tokens)` int64: `guide_targets` of windows that begin at the stream steps `starts` (on the patch
    grid), relative to each window's first token; -1 where a token has no target inside its window."""
    first = starts.long() // patch_len
    if bool((starts.long() % patch_len != 0).any()):
        raise ValueError("guided attention needs windows on the patch grid (train.any_phase off)")
    t = first[:, None] + torch.arange(n_tokens)
    src = torch.as_tensor(targets_T)  # a view of the stream's targets, not a copy per batch
    target = torch.where(t < len(src), src[t.clamp_max(len(src) - 1)], -1)
    rel = target - first[:, None]
    ok = (target >= 0) & (rel >= 0) & (rel <= torch.arange(n_tokens))
    return torch.where(ok, rel, -1)


def attention_logits(mixer, u_BTD: torch.Tensor, heads: int) -> torch.Tensor:
    """`(B, heads, T, T)` fp32 log-probabilities of the first `heads` attention heads of `mixer` (an `OryxMixer`)
    with every token of `u_BTD` a query over the causal past: the logits of its routed attention
    (`kernels.attention.naive.routed_attention`), masked and log-softmaxed."""
    c = mixer.config
    B, T, _ = u_BTD.shape
    _, k, _, _, att_q, _, _ = mixer._projections(u_BTD)
    pos = torch.arange(T, device=u_BTD.device)
    keys, q = routed_inputs(k, att_q, pos, pos, c.rope_base if c.rope else None)
    logits = torch.einsum("bqhk,bshk->bhqs", q[:, :, :heads].float(), keys[:, :, :heads].float())
    logits = logits * mixer.att_log_temp.exp()[:heads].float()[None, :, None, None]
    causal = torch.ones(T, T, dtype=torch.bool, device=u_BTD.device).tril()
    return logits.masked_fill(~causal, float("-inf")).log_softmax(-1)


@contextmanager
def mixer_inputs(model):
    """Collect, in a list, every block mixer's input of the forwards run inside the block (in layer order)."""
    caught: list[torch.Tensor] = []
    hooks = [blk.mixer.register_forward_pre_hook(lambda m, args: caught.append(args[0])) for blk in model.blocks]
    try:
        yield caught
    finally:
        for h in hooks:
            h.remove()


def guided_loss(model, inputs: Sequence[torch.Tensor], targets_BT: torch.Tensor, heads: int) -> torch.Tensor:
    """The guided heads' cross-entropy towards `targets_BT` (`window_targets`), averaged over the tokens
    that have a target and over the layers; `inputs`: each layer's mixer input of the same forward
    (`mixer_inputs`). Zero (with a graph) when no token has a target."""
    if len(inputs) != len(model.blocks):
        raise ValueError(f"expected one mixer input per layer ({len(model.blocks)}), got {len(inputs)}")
    heads = min(heads, model.config.block.n_heads)
    targets = targets_BT.to(inputs[0].device)
    ok = targets >= 0
    total = inputs[0].new_zeros((), dtype=torch.float32)
    for blk, u in zip(model.blocks, inputs):
        logp = attention_logits(blk.mixer, u, heads)  # (B, heads, T, T)
        picked = logp.gather(-1, targets.clamp_min(0)[:, None, :, None].expand(-1, heads, -1, 1))[..., 0]
        total = total - torch.where(ok[:, None], picked, 0.0).sum() / (ok.sum() * heads).clamp_min(1)
    return total / len(model.blocks)

