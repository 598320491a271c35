"""The engine's label bookkeeping (`streams.windows`) (which tokens lie in labelled windows, which windows got attention among
their first tokens) is vectorized over a series' tokens; it must equal the rule written token by token."""

import numpy as np
import pytest

from oryx_ts.streams import Engine
from oryx_ts.streams.windows import labelled, recall
from tests.conftest import random_model


def reference(engine, s, tokens, modes, first_tokens=3):
    """The rule token by token: overlap of the token's [first, last] timestamps with [a, b)."""
    reg, P = s.regularizer, engine.P
    i0 = s.first_index or 0
    labelled, seen, recalled = [], set(), set()
    for n, m in zip(tokens, modes):
        lo, hi = reg.timestamp_of(i0 + n * P), reg.timestamp_of(i0 + (n + 1) * P - 1)
        labelled.append(any(a <= hi and lo < b for a, b in s.labels))
        for k, (a, b) in enumerate(s.labels):
            if a <= hi and lo < b:
                first = ((a - reg.origin) // reg.step - i0) // P
                if n - max(first, 0) < first_tokens:
                    seen.add(k)
                    if m > 0:
                        recalled.add(k)
    return np.array(labelled), seen, recalled


@pytest.mark.parametrize("seed", range(6))
def test_vectorized_labels_and_recall_equal_the_token_by_token_rule(seed):
    rng = np.random.default_rng(seed)
    engine = Engine(random_model())
    step, origin = int(rng.integers(1, 5)), int(rng.integers(-50, 50))
    starts = np.sort(rng.integers(origin - 40, origin + 2_000, size=int(rng.integers(1, 30))))
    labels = [(int(a), int(a + rng.integers(1, 120))) for a in starts]  # off-grid ends, overlaps, before the origin
    engine.add_series("s", step=step, origin=origin, labels=labels)
    s = engine.series["s"]
    x = rng.normal(size=(8 * engine.P, engine.C))
    engine.ingest("s", origin + step * np.arange(len(x)), x)  # fixes the grid (first index 0)
    tokens = np.arange(int(rng.integers(0, 20)), 300)
    modes = (rng.random(len(tokens)) < 0.3).astype(np.float32)
    want_l, want_seen, want_rec = reference(engine, s, tokens, modes)
    assert np.array_equal(labelled([s] * len(tokens), tokens, engine.P), want_l)
    s.windows_seen, s.windows_recalled = set(), set()
    recall([s] * len(tokens), tokens, modes, engine.P)
    assert (s.windows_seen, s.windows_recalled) == (want_seen, want_rec)
    # token by token, as the micro-batch step calls it, gives the same
    s.windows_seen, s.windows_recalled = set(), set()
    for n, m in zip(tokens, modes):
        assert labelled([s], np.array([n]), engine.P)[0] == want_l[n - tokens[0]]
        recall([s], np.array([n]), np.array([m]), engine.P)
    assert (s.windows_seen, s.windows_recalled) == (want_seen, want_rec)
