"""The rare-regime audit's numbers go into reports, so each one is checked on a stream small enough to count by hand."""

from typing import NamedTuple

import numpy as np

from oryx_ts.evaluation.audit import rare_regime_audit, token_mask, token_spans


class LabelWindow(NamedTuple):  # the audit reads any object with start, end and kind
    start: int
    end: int
    kind: str


def test_windows_map_to_the_tokens_whose_patch_they_touch():
    windows = [LabelWindow(5, 9, "spike"), LabelWindow(16, 17, "fault"), LabelWindow(40, 60, "drift")]
    spans = token_spans(windows, n_tokens=5, patch_len=4)
    assert [s.tolist() for s in spans] == [[1, 2], [4]]  # the drift lies past the 5 tokens
    assert token_mask(windows, 5, 4, kinds=["fault"]).tolist() == [False, False, False, False, True]


def test_audit_counts_recall_precision_flops_and_errors():
    P, T, C = 4, 10, 1
    values = np.zeros((T * P + 8, C), dtype=np.float32)
    windows = [LabelWindow(8, 16, "level_shift"), LabelWindow(28, 32, "spike")]  # tokens 2-3 and 7
    modes = np.zeros(T)
    modes[[3, 5]] = 1  # window 1 caught at its second token, window 2 missed, token 5 a false alarm
    forecasts = np.zeros((T, 2, C, 3))
    forecasts[..., 1] = 1.0  # median off by 1 everywhere...
    forecasts[[2, 3, 7], ..., 1] = 3.0  # ...and by 3 at the labelled origins
    forecasts[..., 0], forecasts[..., 2] = forecasts[..., 1] - 1, forecasts[..., 1] + 1
    flops = np.where(modes > 0, 20.0, 10.0)
    audit = rare_regime_audit(
        modes, forecasts, values, windows, patch_len=P, quantiles=np.array([0.1, 0.5, 0.9]), median_index=1,
        flops_T=flops, allowance_T=np.full(T, 12.0), recurrent_T=np.full(T, 10.0), first_tokens=2,
    )
    assert audit.n_windows == 2
    assert audit.window_recall == 0.5
    assert audit.token_recall == 1 / 3
    assert audit.token_precision == 0.5
    assert audit.attention_rate == 0.2
    assert audit.realized_over_budget == 120 / 120
    assert audit.surcharge_over_budget == 20 / 20
    assert audit.mae_in == 3.0 and audit.mae_out == 1.0
    assert audit.crps_in > audit.crps_out
    late = rare_regime_audit(modes, forecasts, values, windows, patch_len=P, quantiles=np.array([0.1, 0.5, 0.9]), median_index=1, first_tokens=1)
    assert late.window_recall == 0.0
