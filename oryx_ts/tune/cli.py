"""`oryx-ts sweep`: Ray Tune sweeps of the budget, shape and router settings, with a Pareto report.

`add_parser(subparsers)` registers the `sweep` command on the top-level parser's sub-parsers; it sets
`func(args) -> int` (the exit code). Ray is imported only when the command runs.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `sweep` command to `subparsers`; returns its parser."""
    parser = subparsers.add_parser("sweep", help="Ray Tune sweep of budget/shape/router settings with a Pareto report")
    parser.set_defaults(func=_cmd_sweep)
    return parser


def _cmd_sweep(args: argparse.Namespace) -> int:
    raise ValueError("oryx-ts sweep is not built yet")
