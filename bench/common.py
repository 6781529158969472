"""Shared bits of the benchmarks: percentiles, RSS, a scratch journal, an SQLite baseline."""

from __future__ import annotations

import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

MASTER = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
MASTER_TAC = bytes.fromhex("101112131415161718191A1B1C1D1E1F")
TERMINAL = bytes.fromhex("000000A00001")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (f"{name:<34} n={len(ms):<6} p50={pct(ms, 50):7.3f} ms  p99={pct(ms, 99):7.3f} ms  "
            f"mean={statistics.fmean(ms):7.3f} ms")


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def scratch_dir() -> Path:
    """Benchmarks write where the journal would: the disk under the work tree, not tmpfs."""
    base = Path(os.environ.get("TAPGATE_BENCH_DIR", "var/bench"))
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=base)).resolve()  # pcscd -c wants an absolute path


def sqlite_commit_times(directory: Path, n: int) -> list[float]:
    """One WAL + synchronous=FULL commit of a journal-sized row: the floor of a durable write."""
    db = sqlite3.connect(directory / "baseline.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
    times = []
    body = os.urandom(300)
    for _ in range(n):
        t0 = time.perf_counter()
        db.execute("BEGIN")
        db.execute("INSERT INTO t (body) VALUES (?)", (body,))
        db.execute("COMMIT")
        times.append(time.perf_counter() - t0)
    db.close()
    return times
