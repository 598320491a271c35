"""`oryx-ts serve`: run the forecasting service with uvicorn, and `oryx-ts serve keys add TENANT`.

`add_parser(subparsers)` registers the `serve` command on the top-level parser's sub-parsers.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `serve` command (and `serve keys add`) to `subparsers`; returns the `serve` parser."""
    parser = subparsers.add_parser(
        "serve", help="run the HTTP forecasting service (uvicorn on 127.0.0.1), or manage its API keys",
        description="Serve forecasts over HTTP: durable ingest (SQLite, fsync), per-tenant series, /metrics. "
                    "Create a key first: `oryx-ts serve keys add TENANT --data-dir DIR`.")
    parser.add_argument("--model", metavar="DIR", help="checkpoint directory (from train or demo)")
    parser.add_argument("--data-dir", metavar="DIR", help="where the SQLite log and the engine snapshots live")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--router", choices=["surprise", "none", "all"], default="surprise",
                        help="attention routing: surprise under the checkpoint's budget (default), none, all")
    parser.add_argument("--no-group-commit", action="store_true", help="one transaction per request (slower; benchmarks)")
    parser.add_argument("--snapshot-every-rows", type=int, default=200_000, metavar="N")
    parser.add_argument("--snapshot-every-s", type=float, default=300.0, metavar="S")
    parser.add_argument("--max-rows", type=int, default=10_000, help="rows per ingest request")
    parser.add_argument("--max-gap", type=int, default=1024, metavar="STEPS",
                        help="reject a row more than STEPS grid steps after its series' newest (default 1024)")
    parser.add_argument("--device", default="auto",
                        help="auto (a CUDA GPU when present, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--rate-limit", type=float, default=0.0, metavar="R",
                        help="requests per second per API key (429 beyond a burst of 2R); 0 = no limit (default)")
    parser.add_argument("--no-adaptation", action="store_true", help="serve the frozen model's forecasts")
    parser.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment, series sharded by hash")
    parser.add_argument("--shards", type=int, default=2, help="with --ray: replicas, one shard of series each")
    parser.add_argument("--address", default=None, help="with --ray: a Ray cluster address (default: a local Ray)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.set_defaults(func=_cmd_serve)

    commands = parser.add_subparsers(dest="serve_command", metavar="{keys}")
    keys = commands.add_parser("keys", help="API keys")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="{add}", required=True)
    add = key_commands.add_parser("add", help="create a key for TENANT; prints it once (only its hash is stored)")
    add.add_argument("tenant")
    add.add_argument("--data-dir", dest="keys_data_dir", metavar="DIR", required=True)
    add.add_argument("--shards", dest="keys_shards", type=int, default=None,
                     help="the key goes into every shard of a --ray data directory")
    add.set_defaults(func=_cmd_keys_add)
    return parser


def _settings(args: argparse.Namespace):
    from oryx_ts.service.settings import Settings

    if not args.model or not args.data_dir:
        raise ValueError("serve needs --model DIR and --data-dir DIR")
    return Settings(model_dir=args.model, data_dir=args.data_dir, router=args.router, group_commit=not args.no_group_commit,
                    snapshot_every_rows=args.snapshot_every_rows, snapshot_every_s=args.snapshot_every_s,
                    max_rows=args.max_rows, adaptation=not args.no_adaptation,
                    rate_limit=args.rate_limit, max_gap=args.max_gap, device=args.device)


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.ray:
        from oryx_ts.service.ray_serve import run

        return run(settings, shards=args.shards, address=args.address, host=args.host, port=args.port)
    import uvicorn

    from oryx_ts.service.app import create_app

    app = create_app(settings)
    # request threads wait for the interpreter lock while the writer thread steps the engine; a
    # shorter switch interval than the default 5 ms lets a short request through sooner
    sys.setswitchinterval(0.001)
    print(f"oryx-ts serve: http://{args.host}:{args.port} (docs at /docs, metrics at /metrics)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def _cmd_keys_add(args: argparse.Namespace) -> int:
    from pathlib import Path

    from oryx_ts.service.store import Database

    root = Path(args.keys_data_dir)
    dirs = [root] if not args.keys_shards else [root / f"shard-{i}" for i in range(args.keys_shards)]
    secret = None
    for d in dirs:
        db = Database(d / "service.sqlite3")
        secret = db.add_key(args.tenant, key=secret) if secret else db.add_key(args.tenant)
    print(secret)
    return 0
