"""What storing the streaming state in bf16 or fp16 costs in accuracy, against the fp32 state.

Legend: B series, L raw steps, T tokens (patches), P patch length, C channels, Hz horizon, Q quantiles.

`compare_state_dtypes` streams the same series through one model once per state dtype, side by
side, one patch per step (on CUDA through a `GraphedStep` per dtype, so 100k steps take seconds),
and accumulates per window of steps, on the device: the forecast error of each dtype against the
stream's next Hz values (MAE of the median level, mean quantile loss), and the drift of each
half-precision forecast from the fp32 one (||f - f_fp32|| / ||f_fp32||). Whether the rounding
error of the stored state accumulates over a long stream shows as a drift that grows window by
window; that it does not shows as a flat one.
"""

import torch
from tqdm import tqdm

from oryx_ts.model import OryxForecaster, pinball_loss


@torch.no_grad()
def compare_state_dtypes(
    model: OryxForecaster,
    x_BLC: torch.Tensor,
    *,
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16),
    window: int = 1000,
    modes_BT: torch.Tensor | None = None,
    graphed: bool | None = None,
    progress: bool = False,
) -> dict:
    """Step every series of `x_BLC` through all its patches with an fp32 state and one state per dtype.

    `modes_BT` (default all 0) are the per-token modes; `graphed` (default: on CUDA with bounded
    retention) replays each step from a CUDA graph; `progress` shows a tqdm bar. Returns per window of `window` steps: `step`
    (the window's last step), and for "fp32" and each dtype `mae`, `quantile_loss`, plus
    `drift` for each dtype; targets past the stream's end are left out.
    """
    cfg = model.config
    P, Hz = cfg.tokenizer.patch_len, cfg.head.horizon
    B, L, C = x_BLC.shape
    T = L // P
    if T < 2:
        raise ValueError(f"need at least 2 patches per series, got length {L} with patch length {P}")
    dev = x_BLC.device
    graphed = dev.type == "cuda" and cfg.block.retention == "bounded" if graphed is None else graphed
    names = ["fp32", *(str(d).removeprefix("torch.") for d in dtypes)]
    states = [model.init_state(B, device=dev, state_dtype=d) for d in (None, *dtypes)]
    if graphed:
        from oryx_ts.step_graph import GraphedStep

        steppers = [GraphedStep(model, s) for s in states]
    else:
        steppers = [lambda p, m, s=s: model.step(p, s, m)[0] for s in states]
    quantiles = model.quantiles
    mid = cfg.head.median_index
    # after the last patch there is nothing left to score; pad the raw stream with NaN targets
    padded = torch.cat([x_BLC, x_BLC.new_full((B, Hz, C), float("nan"))], 1)
    n_win = -(-(T - 1) // window)
    acc = torch.zeros(len(names), 3, n_win, device=dev, dtype=torch.float64)  # mae sum, quantile loss sum, count
    drift = torch.zeros(len(names), 2, n_win, device=dev, dtype=torch.float64)  # ||f - f32||^2, ||f32||^2
    zero = torch.zeros(B, device=dev)
    for t in tqdm(range(T - 1), desc="steps", unit="step", disable=not progress, mininterval=10):
        patch = x_BLC[:, t * P : (t + 1) * P]
        m = zero if modes_BT is None else modes_BT[:, t]
        target_BHzC = padded[:, (t + 1) * P : (t + 1) * P + Hz]
        valid = ~torch.isnan(target_BHzC)
        n_valid = valid.sum()
        w = t // window
        ref = None
        for i, step in enumerate(steppers):
            f_BHzCQ = step(patch, m).float()
            err = torch.where(valid, (f_BHzCQ[..., mid] - target_BHzC).abs(), 0.0).sum()
            acc[i, 0, w] += err
            acc[i, 1, w] += pinball_loss(f_BHzCQ, target_BHzC, quantiles) * n_valid
            acc[i, 2, w] += n_valid
            if i == 0:
                ref = f_BHzCQ.clone()
            else:
                drift[i, 0, w] += (f_BHzCQ - ref).pow(2).sum()
                drift[i, 1, w] += ref.pow(2).sum()
    acc, drift = acc.cpu(), drift.cpu()
    out = {"step": [min((w + 1) * window, T - 1) for w in range(n_win)], "series": B, "steps": T - 1}
    for i, name in enumerate(names):
        count = acc[i, 2].clamp_min(1)
        out[name] = {"mae": (acc[i, 0] / count).tolist(), "quantile_loss": (acc[i, 1] / count).tolist()}
        if i:
            out[name]["drift"] = (drift[i, 0] / drift[i, 1].clamp_min(1e-30)).sqrt().tolist()
    return out
