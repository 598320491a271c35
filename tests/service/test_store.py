"""The SQLite store keeps its promises: WAL with synchronous=FULL, one transaction for every request
waiting at a commit (group commit), sequence numbers that only grow, replay groups as logged."""

import threading

import numpy as np
import pytest

from oryx_ts.service.store import CommitError, Database, Event, Writer, connect


def test_wal_and_full_sync(tmp_path):
    Database(tmp_path / "db.sqlite3")
    conn = connect(tmp_path / "db.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_requests_waiting_together_commit_in_one_transaction(tmp_path):
    db = Database(tmp_path / "db.sqlite3")
    lock = threading.RLock()
    commits = []
    writer = Writer(db.path, lock=lock, before_commit=lambda batch: [Event("flush")], after_commit=lambda seq, locked: None,
                    hold_lock=lambda: False, on_failure=lambda e: None, observe=lambda n, s: commits.append(n))
    writer.start()
    with lock:  # as the app does: apply to the engine, then submit, under the engine lock
        tickets = [writer.submit([Event("obs", "t", f"s{i}", np.array([i, i + 1]), np.ones((2, 3)))]) for i in range(50)]
    last = [writer.wait(t) for t in tickets]
    writer.stop()
    assert commits == [100]  # 50 requests, one transaction, one fsync
    assert last == sorted(last) and len(set(last)) == 50
    seqs = [r[0] for r in db.conn.execute("SELECT seq FROM log ORDER BY rowid")]
    assert seqs == list(range(1, 102))
    events = list(db.events_after(0, 3))
    assert [e.kind for _, e in events] == ["obs"] * 50 + ["flush"]
    assert [e.series for _, e in events[:3]] == ["s0", "s1", "s2"] and events[1][1].ts_n.tolist() == [1, 2]
    assert [e.kind for _, e in db.events_after(seqs[-2], 3)] == ["flush"]


def test_a_failed_commit_fails_everything_queued_behind_it(tmp_path):
    db = Database(tmp_path / "db.sqlite3")
    lock = threading.RLock()
    failures = []
    writer = Writer(db.path, lock=lock, before_commit=lambda batch: [], after_commit=lambda seq, locked: None,
                    hold_lock=lambda: False, on_failure=failures.append)
    writer.fail_next_commit = 1
    writer.start()
    with lock:
        t1 = writer.submit([Event("obs", "t", "s", np.array([1]), np.ones((1, 2)))])
    with pytest.raises(CommitError, match="injected"):
        writer.wait(t1)
    assert len(failures) == 1 and writer.failed is None
    with lock:
        t2 = writer.submit([Event("obs", "t", "s", np.array([1]), np.ones((1, 2)))])
    assert writer.wait(t2) == 1  # the failed batch took no sequence number
    writer.stop()
    assert db.conn.execute("SELECT COUNT(*) FROM log").fetchone()[0] == 1


def test_tenant_names_are_checked(tmp_path):
    db = Database(tmp_path / "db.sqlite3")
    for bad in ["", "a/b", "x" * 65, "tenant one"]:
        with pytest.raises(ValueError, match="tenant must match"):
            db.add_key(bad)
