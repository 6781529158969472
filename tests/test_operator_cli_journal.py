"""`tapgate journal export`, `tapgate journal verify` and `tapgate keygen` as an
operator runs them: the export is the entries' JSON form exactly, with or without
progress, of journals of older schemas too; verify checks signatures when it can read
the device key; keygen keeps a key the journal is signed with; what is not a journal is
refused. Plus the progress bar, and the export of a big journal (a benchmark, run on
demand).
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.cli_journal import Progress, json_line
from daemon.journal import Journal, schema
from protocol import devicekey
from protocol.entry import ENTRY_FIELDS, GENESIS, KIND_REFUSAL, REFUSED, Draft, chain_hash
from tests.cards import TERMINAL_ID
from tests.operator_cli_support import (
    ROOT,
    TAPGATE,
    build_journal,
    config_for,
    digest,
    env,
    tapgate,
)


# --- tapgate journal export / verify ---------------------------------------------------------
def test_export_with_progress_prints_the_same_entries(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    build_journal(journal, 12_345)
    config = config_for(tmp_path, journal)
    plain = tapgate("journal", "export", "--config", str(config))
    progress = tapgate("journal", "export", "--config", str(config), "--progress")
    assert plain.returncode == progress.returncode == 0, progress.stderr
    assert plain.stderr == ""
    assert progress.stdout == plain.stdout
    assert len(plain.stdout.splitlines()) == 12_345
    last = progress.stderr.splitlines()[-1]
    assert "100.0%" in last and "12,345/12,345 entries" in last and "/s" in last, last
    after = tapgate("journal", "export", "--config", str(config), "--after", "12340")
    assert after.stdout.splitlines() == plain.stdout.splitlines()[-5:]


def test_export_is_the_entries_json_form_exactly(tmp_path: Path) -> None:
    """The export builds its lines from rows, not from Entry.to_json: they must agree,
    also on text that JSON has to escape."""
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        for reason in ("plain", 'quote " and \\ backslash', "new\nline\ttab\x7f\x01",
                       "non-ASCII: é ü 日本 😀", ""):
            journal.append(Draft(kind=KIND_REFUSAL, state=REFUSED, terminal_id=TERMINAL_ID,
                                 reason=reason, card_serial=b"\x01\x02", amount=0))
        entries = list(journal.entries())
    done = tapgate("journal", "export", "--config", str(config_for(tmp_path, path)))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    expected = []
    for entry in entries:
        doc = entry.to_json()
        if '"sync_state"' in lines[0]:  # a journal with sync state: pending until acked
            doc["sync_state"] = "pending"
        expected.append(json.dumps(doc, separators=(",", ":")))
    assert lines == expected
    row = tuple(getattr(entries[3], name) for name in ENTRY_FIELDS)
    assert json_line(row) == json.dumps(entries[3].to_json(), separators=(",", ":"))


def test_export_of_a_journal_from_an_older_or_newer_schema(tmp_path: Path) -> None:
    old = tmp_path / "v1.db"
    db = sqlite3.connect(old)
    for statement in schema._V1:  # what tapgate 0.1 created: no signature, no sync state
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    fields = [name for name in ENTRY_FIELDS if name != "sig"]
    values: dict[str, Any] = {name: None for name in fields} | {
        "id": 1, "uuid": "0" * 32, "kind": "refusal", "state": "refused",
        "terminal_id": TERMINAL_ID, "amount": 0, "created_ms": 1, "prev_hash": GENESIS}
    values["hash"] = chain_hash({k: v.hex().upper() if isinstance(v, bytes) else v
                                 for k, v in values.items()})
    db.execute(f"INSERT INTO entry ({', '.join(fields)}) VALUES "
               f"({', '.join('?' * len(fields))})", [values[name] for name in fields])
    db.commit()
    db.close()
    before = digest(old)
    done = tapgate("journal", "export", "--config", str(config_for(tmp_path, old)))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert list(doc) == list(ENTRY_FIELDS) and doc["sig"] is None  # no sync state to show
    assert chain_hash(doc).hex().upper() == doc["hash"]
    assert digest(old) == before  # read as it is: not migrated by a look at it

    newer = tmp_path / "v99.db"
    Journal(newer).open().close()
    db = sqlite3.connect(newer)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    done = tapgate("journal", "tail", "--config", str(config_for(tmp_path, newer)))
    assert done.returncode == 1
    assert f"{newer} has journal schema 99; this tapgate knows up to" in done.stderr


def test_verify_checks_signatures_when_it_can_read_the_device_key(tmp_path: Path) -> None:
    journal, key = tmp_path / "journal.db", tmp_path / "device.key"
    with Journal(journal, signer=devicekey.generate(key)) as writer:
        for _ in range(3):
            writer.append(Draft(kind=KIND_REFUSAL, state=REFUSED, terminal_id=TERMINAL_ID))
    config = config_for(tmp_path, journal, journal={"device_key": str(key)})
    done = tapgate("journal", "verify", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "3 entries, chain intact, 3 signed\n"
    key.chmod(0o644)  # e.g. an operator who may not read it: the chain is still checked
    done = tapgate("journal", "verify", "--config", str(config))
    assert done.returncode == 0
    assert done.stdout == "3 entries, chain intact\n"
    assert done.stderr.startswith("tapgate: signatures not checked: config journal.device_key")


def test_progress_is_drawn_at_most_five_times_a_second() -> None:
    now = [0.0]
    stream = io.StringIO()
    bar = Progress(100_000, stream, tty=True, clock=lambda: now[0])
    for done in range(0, 100_000, 100):  # 1000 updates over 2 simulated seconds
        now[0] += 0.002
        bar.update(done)
    bar.finish(100_000)
    assert 9 <= bar.drawn <= 11
    assert stream.getvalue().endswith("100,000/100,000 entries  50,000/s  in 0:02\x1b[K\n")
    assert "\r" in stream.getvalue() and "ETA" in stream.getvalue()


def test_journal_commands_refuse_what_is_not_a_journal(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "journal.db"
    for args in (["tail"], ["export"], ["salvage", "--out", str(tmp_path / "new.db")]):
        done = tapgate("journal", *args, "--config", str(config_for(tmp_path, missing)))
        assert done.returncode == 1, args
        assert done.stderr == f"tapgate: no journal at {missing}\n"
    assert not missing.parent.exists()


# --- tapgate keygen --------------------------------------------------------------------------
def test_keygen(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    unset = tapgate("keygen", "--config", str(config_for(tmp_path, journal)))
    assert unset.returncode == 2
    assert unset.stderr.startswith("tapgate: config journal.device_key = None: is not set")

    key = tmp_path / "keys" / "device.key"
    config = config_for(tmp_path, journal, journal={"device_key": str(key)})
    done = tapgate("keygen", "--config", str(config))
    assert done.returncode == 0, done.stderr
    public = done.stdout.strip()
    assert len(public) == 64 and public == devicekey.public_hex(devicekey.load(key))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pem = key.read_bytes()

    again = tapgate("keygen", "--config", str(config))
    assert again.returncode == 1
    assert again.stderr == (f"tapgate: {key} exists and the journal is signed with it: "
                            "keeping it (tapgate keygen --force replaces it)\n")
    assert key.read_bytes() == pem

    forced = tapgate("keygen", "--config", str(config), "--force")
    assert forced.returncode == 0
    assert forced.stdout.strip() != public and f"old public key {public}" in forced.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


# --- a million entries ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TAPGATE_BENCH_EXPORT"),
                    reason="a benchmark: set TAPGATE_BENCH_EXPORT=1000000 to run it")
def test_export_of_a_big_journal(tmp_path: Path) -> None:
    n = int(os.environ["TAPGATE_BENCH_EXPORT"])
    journal = tmp_path / "journal.db"
    build_journal(journal, n)
    config = config_for(tmp_path, journal)
    started = time.perf_counter()
    with open(os.devnull, "w") as sink:
        done = subprocess.run([*TAPGATE, "journal", "export", "--config", str(config)],
                              stdout=sink, stderr=subprocess.PIPE, text=True, env=env(),
                              cwd=ROOT, check=False)
    took = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    print(f"\nexport of {n:,} entries into /dev/null: {took:.1f} s ({n / took:,.0f}/s)")
