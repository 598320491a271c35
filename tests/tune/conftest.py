"""Ray drivers for the tune tests: each in its own process group with the local Ray settings, cleaned up by pid."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oryx_ts.tune.local import ray_env

ROOT = Path(__file__).resolve().parents[2]


def _group_pids(pgid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout.split("\n")
    return [int(p) for p, g in (line.split() for line in out if line.strip()) if int(g) == pgid]


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in the group this test started (Ray's agents ignore SIGTERM)."""
    for pid in _group_pids(pgid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while _group_pids(pgid) and time.time() < deadline:
        time.sleep(0.2)


class Drivers:
    """Starts drivers (`start`) and kills what is left of their process groups at teardown."""

    def __init__(self):
        self.groups: list[int] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        env = {**ray_env(), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.groups.append(proc.pid)
        return proc

    def run(self, args: list[str], log: Path, timeout: float) -> int:
        proc = self.start(args, log)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            raise AssertionError(f"{' '.join(args)} ran past {timeout}s; log:\n{log.read_text()[-3000:]}") from None


@pytest.fixture
def drivers():
    d = Drivers()
    yield d
    for pgid in d.groups:
        kill_group(pgid)


PYTHON = sys.executable
CLI = [PYTHON, "-m", "oryx_ts.cli"]
