"""Training on a CUDA device: the same loop, the same first loss as on the CPU, and it learns."""

import numpy as np
import pytest
import torch

from oryx_ts.config import preset
from oryx_ts.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _stream(length: int = 8_000, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(length)[:, None]
    return (np.sin(2 * np.pi * t / 96 + rng.uniform(0, 6, 4)) + 0.1 * rng.standard_normal((length, 4))).astype(np.float32)


def test_training_on_cuda_starts_where_the_cpu_starts_and_learns():
    config = preset("debug", train={"steps": 80, "val_every": 40, "batch_size": 8, "window_tokens": 32})
    values = _stream()
    on_gpu = train(config, values, progress=False, device="cuda")
    assert next(on_gpu.model.parameters()).device.type == "cuda"
    vals = on_gpu.val_losses
    assert vals[-1] < 0.8 * vals[0], vals
    # same seed, same windows, same initial weights: the untrained validation loss and the first
    # training loss agree with the CPU run to float tolerance (tf32 and kernel order differ)
    one_step = config.replace(train={"steps": 1})
    cpu = train(one_step, values, progress=False).history
    gpu = train(one_step, values, progress=False, device="cuda").history
    assert gpu[0]["val_loss"] == pytest.approx(cpu[0]["val_loss"], rel=2e-3)
    assert gpu[1]["train_loss"] == pytest.approx(cpu[1]["train_loss"], rel=2e-3)
