"""The training loop's state: what a run needs to continue where it stopped, and its best weights.

`LoopState` holds the model, AdamW, the learning-rate schedule, the data generator, the step,
the loss history, the schedule's length (a time budget shortens it once it is fitted) and the
early-stopping bookkeeping: the weights of the validation evaluation with the lowest loss, its
step and loss, and how many evaluations since then have not improved on it. `save` writes it as
safetensors plus JSON (nothing pickled) and `load` reads it back, so a resumed run continues
with the same best weights and patience counter as an uninterrupted one.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from oryx_ts.config import OryxConfig
from oryx_ts.model import OryxForecaster

__all__ = ["LOOP_FILE", "LOOP_TENSORS", "LoopState", "lr_factor", "new_loop_state"]

LOOP_FILE = "loop.json"
LOOP_TENSORS = "loop.safetensors"


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier of optimizer step `step + 1`: linear warm-up, then a cosine that reaches 0.1 at step `total_steps`.

    The warm-up lasts `warmup_steps`, at most half of `total_steps`, so that a short run (or one
    whose time budget cut its steps) still decays instead of ending at its peak rate.
    """
    warmup = min(warmup_steps, total_steps // 2)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class LoopState:
    """Everything a run needs to continue where it stopped.

    total: `[steps]` of the schedule (a list the scheduler reads, so fitting a time budget changes it).
    best_step / best_val_loss / best_weights: the validation evaluation with the lowest loss (None
    before the first); `stale`: evaluations since it that did not improve on it (those during the
    warm-up do not count); `stopped`: why the run ended before its schedule (`"patience"`), else None.
    """

    model: OryxForecaster
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    step: int = 0
    history: list[dict] = field(default_factory=list)
    total: list[int] = field(default_factory=lambda: [0])
    best_step: int | None = None
    best_val_loss: float | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    stale: int = 0
    stopped: str | None = None

    def observe(self, val_loss: float, *, patience: int, warmup_steps: int = 0) -> bool:
        """Record a validation loss at the current step; True when early stopping says to stop.

        A loss below the best so far (strictly; a NaN loss only ever replaces a NaN) makes these weights the best and
        resets the count. Otherwise, after the warm-up, the count grows, and with `patience > 0`
        the run stops once `patience` evaluations in a row have not improved.
        """
        best = self.best_val_loss
        if best is None or val_loss < best or (math.isnan(best) and not math.isnan(val_loss)):
            self.best_step, self.best_val_loss, self.stale = self.step, float(val_loss), 0
            self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return False
        if self.step > min(warmup_steps, self.total[0] // 2):
            self.stale += 1
        if patience > 0 and self.stale >= patience:
            self.stopped = "patience"
            return True
        return False

    def restore_best(self) -> bool:
        """Load the best weights into the model; False (and nothing changed) when there are none or they are the model's own."""
        if self.best_weights is None or self.best_step == self.step:
            return False
        self.model.load_state_dict(self.best_weights)
        return True

    def summary(self) -> dict:
        """The validation record of the run: best step and loss, the curve `[[step, loss], ...]`, why it stopped."""
        curve = [[h["step"], h["val_loss"]] for h in self.history if "val_loss" in h]
        return {"best_step": self.best_step, "best_val_loss": self.best_val_loss, "stopped": self.stopped,
                "evaluations_since_best": self.stale, "curve": curve}

    def save(self, directory: str | Path) -> Path:
        """Write the state as safetensors (model, best weights, optimizer moments, generator) plus JSON (the rest); nothing pickled."""
        directory = Path(directory)
        opt = self.optimizer.state_dict()
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if self.best_weights is not None:
            tensors |= {f"best.{k}": v.detach().cpu().contiguous() for k, v in self.best_weights.items()}
        moments: dict[str, dict[str, Any]] = {}
        for idx, entry in opt["state"].items():
            moments[str(idx)] = {}
            for name, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{idx}.{name}"] = value.detach().cpu().contiguous()
                else:
                    moments[str(idx)][name] = value
        tensors["generator"] = self.generator.get_state()
        save_file(tensors, str(directory / LOOP_TENSORS))
        meta = {"config": self.model.config.to_dict(), "param_groups": opt["param_groups"], "moments": moments,
                "scheduler": self.scheduler.state_dict(), "step": self.step, "history": self.history,
                "total_steps": self.total[0], "best_step": self.best_step, "best_val_loss": self.best_val_loss,
                "stale": self.stale, "stopped": self.stopped}
        (directory / LOOP_FILE).write_text(json.dumps(meta))
        return directory / LOOP_FILE

    def load(self, directory: str | Path) -> None:
        """Read a state written by `save`; raises `ValueError` for a missing, corrupt or mismatched one."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / LOOP_FILE).read_text())
            tensors = load_file(str(directory / LOOP_TENSORS))
        except (OSError, json.JSONDecodeError, SafetensorError) as e:
            raise ValueError(f"cannot read the training state in {directory}: {e}") from e
        if OryxConfig.from_dict(meta["config"]) != self.model.config:
            raise ValueError(f"{directory} was written for another config than this run's")
        device = next(self.model.parameters()).device
        self.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        best = {k[len("best."):]: v.to(device) for k, v in tensors.items() if k.startswith("best.")}
        state: dict[int, dict[str, Any]] = {}
        for idx, rest in meta["moments"].items():
            state[int(idx)] = dict(rest)
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.scheduler.load_state_dict(meta["scheduler"])
        self.generator.set_state(tensors["generator"])
        self.step, self.history = int(meta["step"]), list(meta["history"])
        # states written before early stopping existed carry none of these: the best is then unknown
        self.total[0] = int(meta.get("total_steps", self.total[0]))
        self.best_weights = best or None
        self.best_step = meta.get("best_step") if best else None
        self.best_val_loss = meta.get("best_val_loss") if best else None
        self.stale, self.stopped = int(meta.get("stale", 0)), meta.get("stopped")


def new_loop_state(config: OryxConfig, model: OryxForecaster | None, total: list[int] | None = None) -> LoopState:
    """A fresh loop: seeded generator, AdamW with decay on matrices only, warm-up and cosine schedule over `total[0]` steps."""
    t = config.train
    torch.manual_seed(t.seed)
    generator = torch.Generator().manual_seed(t.seed)
    model = model or OryxForecaster(config)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    # fused: one kernel per parameter group instead of a dozen small ops per parameter (a few ms of a CPU step)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=t.lr,
                            fused=True)
    total = total if total is not None else [t.steps]  # a list: a time budget shortens the schedule once it is fitted
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, t.warmup_steps, total[0]))
    return LoopState(model, opt, sched, generator, total=total)
