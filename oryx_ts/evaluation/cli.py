"""`oryx-ts backtest`: replay a dataset's test part through the streams engine, next to peers, and report.

`add_parser(subparsers)` registers the `backtest` command on the top-level parser's sub-parsers;
it sets `func(args) -> int` (the exit code).
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `backtest` command to `subparsers`; returns its parser."""
    parser = subparsers.add_parser("backtest", help="backtest a model and peers on a dataset's test part")
    parser.set_defaults(func=lambda args: 2)
    return parser
