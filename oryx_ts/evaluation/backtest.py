"""Streaming backtest: feed a stream through `model.step` patch by patch, exactly as the service does."""

import numpy as np
import torch
from tqdm.auto import tqdm

from oryx_ts.model import OryxForecaster


@torch.no_grad()
def stream_forecasts(
    model: OryxForecaster, values_LC: np.ndarray, modes_T: torch.Tensor | np.ndarray, *, progress: bool = False, desc: str = "stream"
) -> np.ndarray:
    """Forecasts `(T, Hz, C, Q)` of a single series streamed through `step`; token n uses mode `modes_T[n]`.

    `values_LC` must hold a whole number of patches.
    """
    P = model.config.tokenizer.patch_len
    T = values_LC.shape[0] // P
    if values_LC.shape[0] != T * P:
        raise ValueError(f"stream length {values_LC.shape[0]} is not a multiple of patch_len {P}")
    modes_T = torch.as_tensor(np.asarray(modes_T), dtype=torch.float32)
    x = torch.as_tensor(np.asarray(values_LC, dtype=np.float32))
    state = model.init_state(1, capacity=T)
    out = []
    for n in tqdm(range(T), desc=desc, disable=not progress, leave=False):
        forecast, state = model.step(x[None, n * P : (n + 1) * P], state, modes_T[n : n + 1])
        out.append(forecast[0].numpy())
    return np.stack(out)
