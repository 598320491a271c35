"""`Settings`: everything the service is configured with, in one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["Settings"]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How one service process runs.

    model_dir: checkpoint directory (`oryx_ts.save`). data_dir: the SQLite database
        (`service.sqlite3`) and the engine snapshots (`snapshots/`) live here.
    router: `surprise` (the checkpoint's budget), `none` (all-recurrent) or `all` (all-attention).
    group_commit: True commits every request waiting at that moment in one transaction (one
        fsync) from a writer thread; False commits each request alone (the naive baseline).
    snapshot_every_rows / snapshot_every_s: an engine snapshot is due after this many accepted
        rows or seconds with new rows, whichever comes first (0 turns that trigger off).
    max_rows: rows per ingest request. max_body_bytes: a larger body is a 413.
    max_id_len: longest series id (ids match `[A-Za-z0-9_.:-]+`).
    max_series_per_tenant: series one tenant may hold.
    tolerance / duplicates: the regularizer's late and repeated-row policy for every series.
    max_gap: a row more than this many grid steps after a series' newest accepted step is rejected
        ("too_far"): the gap would be stepped as that many missing rows, in the commit path.
    adaptation: per-series online adaptation of the forecasts.
    max_batch: series per engine micro-batch.
    device: where the engine steps: "auto" (the first CUDA GPU when one is present, else the CPU),
        "cpu", "cuda" or "cuda:N". Recovery replays the log on whatever device the restarted service
        has; bit-for-bit equality with a server that never stopped holds on the same device.
    rate_limit: requests per second per API key (a token bucket holding `rate_burst` requests; an
        empty bucket answers 429 with Retry-After); 0 turns it off. rate_burst 0: twice rate_limit.
    """

    model_dir: Path
    data_dir: Path
    router: Literal["surprise", "none", "all"] = "surprise"
    group_commit: bool = True
    snapshot_every_rows: int = 200_000
    snapshot_every_s: float = 300.0
    max_rows: int = 10_000
    max_body_bytes: int = 4 << 20
    max_id_len: int = 128
    max_series_per_tenant: int = 100_000
    tolerance: int = 0
    duplicates: Literal["reject", "first", "last"] = "reject"
    max_gap: int = 1024
    adaptation: bool = True
    max_batch: int = 1024
    device: str = "auto"
    rate_limit: float = 0.0
    rate_burst: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.router not in ("surprise", "none", "all"):
            raise ValueError(f"router must be surprise, none or all, got {self.router!r}")
        for name in ("max_rows", "max_body_bytes", "max_id_len", "max_series_per_tenant", "max_batch", "max_gap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.rate_limit >= 0 or self.rate_burst < 0:
            raise ValueError(f"rate_limit and rate_burst must be >= 0, got {self.rate_limit} and {self.rate_burst}")
        if self.snapshot_every_rows < 0 or self.snapshot_every_s < 0:
            raise ValueError("snapshot_every_rows and snapshot_every_s must be >= 0 (0 = off)")

    def resolved_device(self) -> str:
        """The torch device the engine uses; raises `ValueError` for an unknown or absent device."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            return "cpu"
        if self.device == "cuda" or (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            index = int(self.device[5:] or 0) if ":" in self.device else 0
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise ValueError(f"device {self.device!r}: no such CUDA device here ({torch.cuda.device_count()} present)")
            return self.device
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def database(self) -> Path:
        return self.data_dir / "service.sqlite3"

    @property
    def snapshots(self) -> Path:
        return self.data_dir / "snapshots"
