"""The service's durable store: SQLite (WAL, `synchronous=FULL`) holding tenants, hashed API keys,
series, the event log and the snapshots taken, plus the group-commit `Writer`.

The log is the source of truth. Every change to engine state is one log row with a sequence
number `seq` that only grows: `create` and `delete` of a series, each accepted observation
(`obs`: its timestamp and float64 values, `push` = the seq of the first row of the ingest call it
came from, so a replay repeats the same calls), and `flush` (the engine stepped every queued patch
here; replaying flushes at the same points gives the same micro-batches, hence the same bits).

Writer: request threads call `submit` while holding the engine lock, right after applying their
change to the engine, so the queue order is the engine's order. The writer thread takes the
engine lock, drains the queue, runs `before_commit` (the app flushes the engine and adds a `flush`
row), releases the lock, writes every drained row in one transaction, commits (one fsync for all
of them) and only then wakes the requests. Transactions commit in queue order, so the committed
log is always a prefix of what the engine applied. When a commit fails, the batch and everything
queued behind it fail, and `on_failure` rebuilds the engine from the durable prefix before any
other request touches it.

Keys are `oryx_<key id>_<secret>`; the database holds the key id, a random 16-byte salt and
sha256(salt || secret), never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = ["CommitError", "Database", "Event", "Ticket", "Writer", "TENANT_RE"]

TENANT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KEY_RE = re.compile(r"^oryx_([0-9a-f]{16})_([A-Za-z0-9_-]{20,100})$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (id TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL REFERENCES tenants(id),
    salt BLOB NOT NULL, digest BLOB NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS series (
    tenant TEXT NOT NULL, id TEXT NOT NULL, channels TEXT NOT NULL, step INTEGER NOT NULL,
    origin INTEGER, labels TEXT NOT NULL, created_seq INTEGER NOT NULL, PRIMARY KEY (tenant, id)
);
CREATE TABLE IF NOT EXISTS log (
    seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, tenant TEXT, series TEXT,
    push INTEGER, ts INTEGER, vals BLOB, body TEXT
);
CREATE TABLE IF NOT EXISTS snapshots (seq INTEGER NOT NULL, taken REAL NOT NULL, series INTEGER NOT NULL);
"""


class CommitError(RuntimeError):
    """The rows of a request could not be made durable; nothing of the request is acknowledged."""


@dataclass
class Event:
    """One change to engine state, as logged. `obs` carries rows `ts_n` (int64) and `vals_nC` (float64)."""

    kind: Literal["create", "delete", "obs", "flush"]
    tenant: str | None = None
    series: str | None = None
    ts_n: np.ndarray | None = None
    vals_nC: np.ndarray | None = None
    body: dict[str, Any] | None = None


@dataclass
class Ticket:
    """A request's place in the commit queue; `wait` on the writer returns once it is durable."""

    events: list[Event]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    last_seq: int = 0


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class Database:
    """Tenants, keys, series metadata and log reads. Writes to the log go through a `Writer`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = connect(self.path)
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal":
            raise ValueError(f"{self.path}: SQLite refused WAL mode (got {mode})")
        conn.executescript(_SCHEMA)
        conn.close()

    @property
    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = connect(self.path)
        return c

    # --- tenants and keys -------------------------------------------------------------------

    def add_key(self, tenant: str, key: str | None = None) -> str:
        """Create an API key for `tenant` (creating the tenant); returns the key, which is stored only hashed.

        `key`: register this existing key instead of a new one (the shards of a Ray deployment share keys).
        """
        if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
            raise ValueError(f"tenant must match {TENANT_RE.pattern}, got {tenant!r}")
        if key is None:
            key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        elif (m := _KEY_RE.match(key)) is not None:
            key_id, secret = m.groups()
        else:
            raise ValueError("not an oryx_ts API key")
        salt = secrets.token_bytes(16)
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT OR IGNORE INTO tenants VALUES (?, ?)", (tenant, time.time()))
            self.conn.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?)",
                              (key_id, tenant, salt, _digest(salt, secret), time.time()))
        return f"oryx_{key_id}_{secret}"

    def tenant_of(self, key: str) -> str | None:
        """The tenant a key belongs to, or None for a malformed, unknown or wrong key (constant-time compare)."""
        m = _KEY_RE.match(key or "")
        if m is None:
            return None
        row = self.conn.execute("SELECT tenant, salt, digest FROM api_keys WHERE key_id = ?", (m.group(1),)).fetchone()
        if row is None:
            return None
        tenant, salt, digest = row
        return tenant if hmac.compare_digest(_digest(salt, m.group(2)), digest) else None

    # --- reads ------------------------------------------------------------------------------

    def series_info(self, tenant: str, series: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT channels, step, origin, labels, created_seq FROM series WHERE tenant = ? AND id = ?",
                                (tenant, series)).fetchone()
        if row is None:
            return None
        return {"channels": json.loads(row[0]), "step": row[1], "origin": row[2], "labels": json.loads(row[3]),
                "created_seq": row[4]}

    def last_seq(self) -> int:
        return self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM log").fetchone()[0]

    def events_after(self, seq: int, channels: int) -> Iterator[tuple[int, Event]]:
        """Logged events with a sequence number above `seq`, in order; the rows of one ingest call come as one `obs`."""
        cur = self.conn.execute("SELECT seq, kind, tenant, series, push, ts, vals, body FROM log WHERE seq > ? ORDER BY seq", (seq,))
        group: list[tuple] = []

        def emit() -> tuple[int, Event]:
            ts = np.array([r[5] for r in group], dtype=np.int64)
            vals = np.frombuffer(b"".join(r[6] for r in group), dtype=np.float64).reshape(len(group), channels)
            return group[-1][0], Event("obs", group[0][2], group[0][3], ts, vals)

        for row in cur:
            if row[1] == "obs":
                if group and row[4] != group[0][4]:
                    yield emit()
                    group = []
                group.append(row)
                continue
            if group:
                yield emit()
                group = []
            yield row[0], Event(row[1], row[2], row[3], body=json.loads(row[7]) if row[7] else None)
        if group:
            yield emit()

    def record_snapshot(self, seq: int, series: int) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT INTO snapshots VALUES (?, ?, ?)", (seq, time.time(), series))

    def snapshots(self) -> list[tuple[int, float, int]]:
        return self.conn.execute("SELECT seq, taken, series FROM snapshots ORDER BY rowid").fetchall()

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def write_events(conn: sqlite3.Connection, events: list[Event], next_seq: int) -> int:
    """Insert `events` from sequence number `next_seq` on, inside the caller's transaction; returns the next free seq."""
    rows = []
    seq = next_seq
    for e in events:
        if e.kind == "obs":
            push = seq
            for t, v in zip(e.ts_n.tolist(), e.vals_nC):
                rows.append((seq, "obs", e.tenant, e.series, push, t, np.ascontiguousarray(v, dtype=np.float64).tobytes(), None))
                seq += 1
            continue
        rows.append((seq, e.kind, e.tenant, e.series, None, None, None, json.dumps(e.body) if e.body is not None else None))
        if e.kind == "create":
            b = e.body
            conn.execute("INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (e.tenant, e.series, json.dumps(b["channels"]), b["step"], b["origin"], json.dumps(b["labels"]), seq))
        elif e.kind == "delete":
            conn.execute("DELETE FROM series WHERE tenant = ? AND id = ?", (e.tenant, e.series))
        seq += 1
    conn.executemany("INSERT INTO log VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return seq


class Writer:
    """Commits queued events; see the module docstring for the ordering argument.

    lock: the engine lock (held by callers of `submit` and `commit_alone`).
    before_commit(tickets) -> extra events: called under the lock with the drained batch.
    after_commit(last_seq, locked) -> None: called after every successful commit; `locked` tells
        whether the engine lock is still held (it is when `hold_lock()` said so before the commit).
    hold_lock() -> bool: keep the engine lock through this commit (a snapshot follows).
    on_failure(error) -> None: called under the lock after a failed commit; rebuilds the engine.
    group: False disables the writer thread; callers use `commit_alone` (one transaction each).
    """

    def __init__(self, path: Path, *, lock: threading.RLock, before_commit: Callable[[list[Ticket]], list[Event]],
                 after_commit: Callable[[int, bool], None], hold_lock: Callable[[], bool],
                 on_failure: Callable[[BaseException], None], group: bool = True, tick_s: float = 0.5,
                 observe: Callable[[int, float], None] | None = None):
        self.conn = connect(path)
        self.lock = lock
        self.before_commit, self.after_commit, self.hold_lock, self.on_failure = before_commit, after_commit, hold_lock, on_failure
        self.observe = observe
        self.group = group
        self.tick_s = tick_s
        self.next_seq = self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM log").fetchone()[0] + 1
        self.failed: BaseException | None = None
        self._queue: list[Ticket] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.fail_next_commit = 0  # tests: make the next N commits raise

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self.group and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="oryx-writer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Commit what is queued, then end the writer thread."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def submit(self, events: list[Event]) -> Ticket:
        """Queue events (call with the engine lock held, right after applying them)."""
        ticket = Ticket(events)
        if self.failed is not None:
            ticket.error = CommitError(f"storage failed: {self.failed}")
            ticket.done.set()
            return ticket
        with self._cv:
            self._queue.append(ticket)
            self._cv.notify()
        return ticket

    def wait(self, ticket: Ticket, timeout: float = 60.0) -> int:
        """Block until the ticket's events are committed; returns the last seq; raises `CommitError`."""
        if not ticket.done.wait(timeout):
            raise CommitError(f"commit did not finish within {timeout} s")
        if ticket.error is not None:
            raise CommitError(str(ticket.error))
        return ticket.last_seq

    def commit_alone(self, events: list[Event]) -> int:
        """Naive mode: write and commit these events now, in the caller's thread (engine lock held)."""
        ticket = Ticket(events)
        extra = self.before_commit([ticket])
        self._commit([ticket], extra)
        if ticket.error is not None:
            self._recover(ticket.error)
            raise CommitError(str(ticket.error))
        self.after_commit(ticket.last_seq, True)
        return ticket.last_seq

    def tick(self) -> None:
        """Wake the writer (a time-based snapshot may be due)."""
        with self._cv:
            self._cv.notify()

    def _commit(self, batch: list[Ticket], extra: list[Event]) -> None:
        events = [e for t in batch for e in t.events] + extra
        t0 = time.perf_counter()
        start = self.next_seq
        try:
            if self.fail_next_commit > 0:
                self.fail_next_commit -= 1
                raise sqlite3.OperationalError("disk I/O error (injected)")
            self.conn.execute("BEGIN IMMEDIATE")
            end = write_events(self.conn, events, start)
            self.conn.execute("COMMIT")
        except Exception as e:  # noqa: BLE001 - any failure means: not durable
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for t in batch:
                t.error = e
            return
        self.next_seq = end
        seq = start
        for t in batch:
            for e in t.events:
                seq += len(e.ts_n) if e.kind == "obs" else 1
            t.last_seq = seq - 1
        if self.observe is not None:
            self.observe(sum(len(e.ts_n) for e in events if e.kind == "obs"), time.perf_counter() - t0)

    def _recover(self, error: BaseException) -> None:
        """Under the lock: fail everything queued behind the failed batch, then rebuild the engine."""
        self.failed = error
        with self._cv:
            queued, self._queue = self._queue, []
        for t in queued:
            t.error = CommitError(f"an earlier commit failed: {error}")
            t.done.set()
        try:
            self.on_failure(error)
        except Exception as e:  # noqa: BLE001 - stays failed: every write answers 503
            self.failed = e
            return
        self.failed = None

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop and not self.hold_lock():
                    self._cv.wait(self.tick_s)
                if self._stop and not self._queue:
                    return
            self.lock.acquire()
            locked = True
            try:
                with self._cv:
                    batch, self._queue = self._queue, []
                extra = self.before_commit(batch) if batch else []
                if not self.hold_lock():
                    self.lock.release()
                    locked = False
                if batch or extra:
                    self._commit(batch, extra)
                failed = batch[0].error if batch and batch[0].error is not None else None
                if failed is not None:
                    if not locked:
                        self.lock.acquire()
                        locked = True
                    self._recover(failed)
                else:
                    self.after_commit(self.next_seq - 1, locked)
            finally:
                if locked:
                    self.lock.release()
            for t in batch:
                t.done.set()
