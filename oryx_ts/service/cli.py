"""`oryx-ts serve`: run the forecasting service with uvicorn, and manage its API keys.

`add_parser(subparsers)` registers the `serve` command on the top-level parser's sub-parsers.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `serve` command to `subparsers`; returns its parser."""
    parser = subparsers.add_parser("serve", help="run the HTTP forecasting service (uvicorn, 127.0.0.1)")
    parser.set_defaults(func=lambda args: 0)
    return parser
