"""What the tests of the operator's commands share: `tapgate` run as an operator runs
it (a separate process), configs and journals to run it on, a status board as a running
daemon writes it, a file's digest.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from daemon.journal import Journal
from daemon.status import StatusBoard
from hal.reader.base import ReaderState
from protocol.entry import ENTRY_FIELDS, GENESIS, chain_hash
from tests.cards import TERMINAL_ID
from tests.configs import raw_config, toml_text

ROOT = Path(__file__).resolve().parent.parent
TAPGATE = [sys.executable, "-m", "daemon.cli"]


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TAPGATE_")}
    clean["PYTHONUNBUFFERED"] = "1"
    return clean


def tapgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TAPGATE, *args], capture_output=True, text=True, timeout=120,
                          env=env(), cwd=ROOT, check=False)


def write_config(path: Path, raw: dict[str, dict[str, Any]]) -> Path:
    path.write_text(toml_text(raw), encoding="utf-8")
    return path


def config_for(tmp_path: Path, journal_path: Path, name: str = "tapgate.toml",
               **sections: dict[str, Any]) -> Path:
    raw = raw_config(journal_path)
    for section, table in sections.items():
        raw.setdefault(section, {}).update(table)
    return write_config(tmp_path / name, raw)


def build_journal(path: Path, n: int, *, first_id: int = 1) -> None:
    """A valid journal of ``n`` entries written straight into SQLite (Journal.append
    fsyncs every entry): intents and completions of a few cards, hashes chained."""
    Journal(path).open().close()
    db = sqlite3.connect(path)
    insert = (f"INSERT INTO entry ({', '.join(ENTRY_FIELDS)}) "
              f"VALUES ({', '.join('?' * len(ENTRY_FIELDS))})")
    prev, rows, seq = GENESIS, [], 0
    for i in range(first_id, first_id + n):
        seq += i % 2
        values: dict[str, Any] = {
            "id": i, "uuid": uuid.uuid4().hex, "kind": "debit",
            "state": "intent" if i % 2 else "completed", "terminal_id": TERMINAL_ID,
            "amount": 250, "reason": None,
            "card_serial": bytes.fromhex("88010000") + (i % 7).to_bytes(4, "big"),
            "card_type": 1, "balance_before": 5000, "balance_after": None if i % 2 else 4750,
            "card_counter": i // 2, "card_random": os.urandom(4), "terminal_seq": seq,
            "tx_date": "20260504", "tx_time": "080000",
            "mac2": None if i % 2 else os.urandom(4), "tac": None if i % 2 else os.urandom(4),
            "ref": None if i % 2 else i - 1, "created_ms": 1_777_870_800_000 + i * 1000,
            "prev_hash": prev, "hash": b"", "sig": None}
        doc = {k: v.hex().upper() if isinstance(v, bytes) else v for k, v in values.items()}
        values["hash"] = prev = chain_hash(doc)
        rows.append(tuple(values[name] for name in ENTRY_FIELDS))
    with db:
        db.executemany(insert, rows)
    db.close()


def running_board(**kw: Any) -> StatusBoard:
    board = StatusBoard(terminal_id=TERMINAL_ID, reader_name="sim", pid=os.getpid(), **kw)
    board.set_reader_state(ReaderState.READY)
    board.set_interval(5.0)
    return board


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
