"""`to_parquet`: a generated labelled stream written to one Parquet file in bounded memory, chunk by chunk
(the renders of `synthetic` are bit-identical in any chunking), with its labels in the file's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from oryx_ts.datasets.synthetic import PARQUET_META_KEY, SyntheticConfig, _chunk_ranges, _grid, _plan, _render

__all__ = ["to_parquet"]


def to_parquet(
    path: str | Path,
    length: int,
    channels: int = 8,
    *,
    seed: int = 0,
    config: SyntheticConfig | None = None,
    chunk: int = 1 << 18,
    progress: bool | None = None,
) -> Path:
    """Stream a generated series to one Parquet file in bounded memory (about one chunk).

    Columns: `timestamp` (when the config has a start) and `ch0..ch{C-1}` float32 (null = missing).
    The labels, seed and config are stored as JSON in the file's key-value metadata under
    "oryx_ts", so `oryx_ts.datasets.read(path)` restores the labelled stream.
    """
    import polars as pl
    from polars.io.plugins import register_io_source

    config = config or SyntheticConfig()
    plan = _plan(length, channels, seed, config)
    start, step = _grid(config)
    names = [f"ch{i}" for i in range(channels)]
    schema: dict[str, pl.DataType] = {}
    if start is not None:
        schema["timestamp"] = pl.Datetime("us")
    schema.update({n: pl.Float32() for n in names})
    ranges = _chunk_ranges(length, chunk)
    show = len(ranges) > 4 if progress is None else progress

    def source(with_columns, predicate, n_rows, batch_size):
        for a, b in tqdm(ranges, desc="to_parquet", unit="chunk", disable=not show):
            values = _render(plan, a, b)
            columns = {}
            if start is not None:
                columns["timestamp"] = (start + np.arange(a, b) * step).astype("datetime64[us]")
            columns.update({n: values[:, i] for i, n in enumerate(names)})
            frame = pl.DataFrame(columns).with_columns(pl.col(names).fill_nan(None))
            yield frame if with_columns is None else frame.select(with_columns)

    meta = {
        "source": "synthetic",
        "seed": seed,
        "length": length,
        "channels": names,
        "start": None if start is None else str(start),
        "step_seconds": None if step is None else int(step / np.timedelta64(1, "s")),
        "config": config.to_dict(),
        "labels": [[w.start, w.end, w.kind] for w in plan.labels],
        "recurrences": [[p[0].start, p[1].start, len(p[0])] for p in plan.recurrences],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = register_io_source(source, schema=pl.Schema(schema))
    frame.sink_parquet(path, metadata={PARQUET_META_KEY: json.dumps(meta)}, row_group_size=chunk,
                       engine="streaming")
    return path
