"""Training: mixed-mode quantile regression on windows of one long stream.

Windows come from the head of the stream, validation from its tail. Each batch gets one mode
pattern shared by its windows (so attention is computed only for the attention chunks): chunks of
`mode_chunk` tokens run in attention mode with probability `attention_fraction`, and a share
`full_mode_fraction` of batches runs entirely in one mode, half of them all-attention, so that
each mode alone and every mix work.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from oryx_ts.checkpoint import save
from oryx_ts.config import OryxConfig
from oryx_ts.datasets.windows import WindowSampler
from oryx_ts.model import OryxForecaster


@dataclass
class TrainResult:
    model: OryxForecaster
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None

    @property
    def val_losses(self) -> list[float]:
        return [h["val_loss"] for h in self.history if "val_loss" in h]


def fixed_schedule(n_tokens: int, every: int = 4, offset: int | None = None) -> torch.Tensor:
    """1-in-`every` attention schedule over tokens: token n runs attention when n % every == offset (default every-1)."""
    offset = every - 1 if offset is None else offset
    return (torch.arange(n_tokens) % every == offset).float()


def sample_modes(n_tokens: int, config: OryxConfig, generator: torch.Generator) -> torch.Tensor:
    """A training mode pattern `(n_tokens,)`: random chunks, or a whole window in one mode."""
    t = config.train
    u = torch.rand(2, generator=generator)
    if u[0] < t.full_mode_fraction:
        return torch.full((n_tokens,), float(u[1] < 0.5))
    n_chunks = -(-n_tokens // t.mode_chunk)
    chunk_modes = (torch.rand(n_chunks, generator=generator) < t.attention_fraction).float()
    return chunk_modes.repeat_interleave(t.mode_chunk)[:n_tokens]


@torch.no_grad()
def validation_loss(model: OryxForecaster, sampler: WindowSampler, *, batch_size: int, max_batches: int = 8) -> float:
    """Mean loss over validation windows in the 1-in-4 schedule."""
    was_training = model.training
    model.eval()
    T = sampler.window // model.config.tokenizer.patch_len
    modes = fixed_schedule(T)
    losses = [model.loss(x, modes).item() for _, x in zip(range(max_batches), sampler.sequential(batch_size))]
    model.train(was_training)
    return float(np.mean(losses))


def train(
    config: OryxConfig,
    values: np.ndarray | torch.Tensor,
    *,
    model: OryxForecaster | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fit an OryxForecaster on a `(L, C)` stream (NaN = missing) and return it with its loss history.

    The last `config.train.val_fraction` of the stream is held out for validation. If `out_dir` is
    given, the final model is saved there as a checkpoint. Raises `ValueError` if the stream does
    not match the config's channel count or is too short for a training and a validation window.
    """
    t = config.train
    values = torch.as_tensor(np.asarray(values, dtype=np.float32))
    C = config.tokenizer.channels
    if values.dim() != 2 or values.shape[1] != C:
        raise ValueError(f"expected a stream of shape (length, {C}), got {tuple(values.shape)}")
    P = config.tokenizer.patch_len
    window = t.window_tokens * P
    split = int(values.shape[0] * (1 - t.val_fraction))
    train_windows = WindowSampler(values, window, stop=split, align=P)
    val_windows = WindowSampler(values, window, start=split, align=P)

    torch.manual_seed(t.seed)
    generator = torch.Generator().manual_seed(t.seed)
    model = model or OryxForecaster(config)
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=t.lr
    )

    def lr_at(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress_ = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    result = TrainResult(model=model)
    result.history.append({"step": 0, "val_loss": validation_loss(model, val_windows, batch_size=t.batch_size)})
    bar = tqdm(range(1, t.steps + 1), desc="train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        x = train_windows.sample(t.batch_size, generator)
        loss = model.loss(x, sample_modes(t.window_tokens, config, generator))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        record = {"step": step, "train_loss": loss.item(), "grad_norm": float(grad_norm)}
        if step % t.val_every == 0 or step == t.steps:
            record["val_loss"] = validation_loss(model, val_windows, batch_size=t.batch_size)
            bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{record['val_loss']:.4f}")
        result.history.append(record)
    model.eval()
    if out_dir is not None:
        result.checkpoint = save(model, out_dir, extra={"history": result.history})
    return result
