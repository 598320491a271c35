"""Ray Tune sweeps and Ray Train multi-worker training over oryx_ts.

Nothing here imports ray at module import time: the core install has no ray, and `oryx-ts --help`
must work without it. `spaces` and `pareto` need no ray at all.
"""
