"""The streaming step's concatenated weights are kept between steps only while every weight is unchanged."""

import torch
from torch import nn

from oryx_ts.block import _step_cat


def test_kept_until_a_weight_changes():
    owner = nn.Module()
    a, b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(2, 4))
    with torch.no_grad():
        first = _step_cat(owner, [a, b])
        assert _step_cat(owner, [a, b]) is first  # no copy on the next step
        torch.testing.assert_close(first, torch.cat([a, b]), rtol=0, atol=0)
        a.add_(1.0)  # an in-place update (an optimizer step, load_state_dict)
        after = _step_cat(owner, [a, b])
        assert after is not first
        torch.testing.assert_close(after, torch.cat([a, b]), rtol=0, atol=0)
        b.data = torch.randn(2, 4)  # new storage
        torch.testing.assert_close(_step_cat(owner, [a, b]), torch.cat([a, b]), rtol=0, atol=0)
    # with autograd on nothing is kept: the result carries the graph to the weights
    out = _step_cat(owner, [a, b])
    assert out.requires_grad and out is not _step_cat(owner, [a, b])
