"""The operator's commands (status, journal tail/export/salvage, keygen, config check) as
an operator runs them: a separate process, its exit status, its output. Plus the status
board and its writer, which the daemon runs."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import queue
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import devicekey
from daemon.cli_journal import Progress, json_line
from daemon.config import validate
from daemon.journal import Draft, Journal, schema
from daemon.journal.entry import ENTRY_FIELDS, GENESIS, KIND_REFUSAL, REFUSED, chain_hash
from daemon.outcome import Outcome, TapResult
from daemon.status import StatusBoard, liveness, read_status, run_status_writer
from hal.card.model import Fault, FaultKind
from hal.reader.base import ReaderState
from tests.helpers import INS_DEBIT, MASTER_KEY, TERMINAL_ID, Rig, raw_config, toml_text

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


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A config and a journal with taps in it: three accepted, a refusal, and a tear
    still awaiting its card."""
    rig = Rig(tmp_path / "gate")
    for n in range(1, 4):
        assert rig.tap(rig.card(n, 1000)).outcome is Outcome.ACCEPTED
    assert rig.tap(rig.card(10, 10)).outcome is Outcome.REFUSED
    torn = rig.card(9, 1000)
    torn.inject(Fault(FaultKind.TEAR_AFTER, ins=INS_DEBIT))
    assert rig.tap(torn).torn
    rig.close()
    yield config_for(tmp_path, rig.journal_path), rig.journal_path


def running_board(**kw: Any) -> StatusBoard:
    board = StatusBoard(terminal_id=TERMINAL_ID, reader_name="sim", pid=os.getpid(), **kw)
    board.set_reader_state(ReaderState.READY)
    board.set_interval(5.0)
    return board


# --- tapgate status --------------------------------------------------------------------------
def test_status_without_a_daemon(gate: tuple[Path, Path]) -> None:
    config, _ = gate
    done = tapgate("status", "--config", str(config))
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "tapgate:             not running (no status file)"
    assert "pending sync:        9 (no uplink configured)" in lines
    assert "pending recoveries:  1" in lines
    assert any(line.startswith("  8801000000000009      2.50  torn ") for line in lines)
    taps = lines[lines.index("last 5 taps:") + 1:]
    assert [t.split()[2:] for t in taps] == [
        ["8801000000000001", "2.50", "completed"], ["8801000000000002", "2.50", "completed"],
        ["8801000000000003", "2.50", "completed"],
        ["880100000000000A", "-", "refused", "(insufficient", "balance)"],
        ["8801000000000009", "2.50", "torn", "(card", "left", "during", "the", "debit)"]]


def test_status_never_creates_a_journal(tmp_path: Path) -> None:
    journal = tmp_path / "var" / "journal.db"
    done = tapgate("status", "--config", str(config_for(tmp_path, journal)))
    assert done.returncode == 1
    assert f"journal:             no journal at {journal}" in done.stdout.splitlines()
    assert not journal.parent.exists()


def test_status_of_a_running_daemon(gate: tuple[Path, Path]) -> None:
    config, journal = gate
    board = running_board()
    board.note_tap(TapResult(Outcome.ACCEPTED, serial=b"\x88" * 8, amount=250))
    board.note_tap(TapResult(Outcome.REFUSED, "card expired"))
    board.write(journal.with_name("status.json"))
    done = tapgate("status", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"tapgate:             running (pid {os.getpid()}, up ")
    assert "reader:              sim: ready" in lines
    assert "broker link:         not configured" in lines
    assert "taps since start:    1 accepted, 1 refused" in lines
    assert "alarms:              none" in lines

    board.set_alarm("journal full", True)
    board.write(journal.with_name("status.json"))
    done = tapgate("status", "--config", str(config))
    assert done.returncode == 1
    assert "alarms:              journal full" in done.stdout.splitlines()


def test_status_json(gate: tuple[Path, Path]) -> None:
    config, journal = gate
    running_board().write(journal.with_name("status.json"))
    done = tapgate("status", "--config", str(config), "--json", "-n", "2")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["ok"] is True and doc["daemon"]["running"] is True
    assert doc["daemon"]["pid"] == os.getpid()
    assert doc["status"]["reader"] == {"name": "sim", "state": "ready"}
    assert doc["journal"]["entries"] == doc["journal"]["pending_sync"] == 9
    assert [r["card_serial"] for r in doc["journal"]["pending_recoveries"]] == [
        "8801000000000009"]
    assert [t["outcome"] for t in doc["journal"]["last_taps"]] == ["refused", "torn"]


@pytest.mark.parametrize("change, summary", [
    ({"state": "stopped"}, "not running (stopped "),
    ({"updated_at": time.time() - 7200}, f"not responding (pid {os.getpid()}, status 2h"),
    ({"pid": 0}, "not running (status "),
    ({"started_at": time.time() - 86400 * 30}, "not running (status "),  # the pid was reused
])
def test_status_of_a_daemon_that_is_gone(gate: tuple[Path, Path], change: dict[str, Any],
                                         summary: str) -> None:
    config, journal = gate
    doc = running_board().snapshot()
    doc.update(change)
    journal.with_name("status.json").write_text(json.dumps(doc))
    done = tapgate("status", "--config", str(config))
    assert done.returncode == 1
    assert done.stdout.splitlines()[0].startswith("tapgate:             " + summary), done.stdout


# --- tapgate journal tail / export -----------------------------------------------------------
def test_tail(gate: tuple[Path, Path]) -> None:
    config, _ = gate
    done = tapgate("journal", "tail", "--config", str(config), "-n", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["#7", "#8", "#9"]
    assert lines[0].split()[3:6] == ["refusal/refused", "card", "880100000000000A"]
    assert lines[2].split()[3] == "debit/torn" and "ref #8" in lines[2]
    as_json = tapgate("journal", "tail", "--config", str(config), "-n", "3", "--json")
    export = tapgate("journal", "export", "--config", str(config))
    assert as_json.stdout.splitlines() == export.stdout.splitlines()[-3:]


def test_tail_follow_picks_up_new_entries_and_stops_on_sigterm(
        gate: tuple[Path, Path]) -> None:
    config, journal = gate
    proc = subprocess.Popen([*TAPGATE, "journal", "tail", "--config", str(config), "-n", "1",
                             "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(), cwd=ROOT)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert lines.get(timeout=30).startswith("#9 ")
        with Journal(journal) as writer:
            for _ in range(3):
                writer.append(Draft(kind=KIND_REFUSAL, state=REFUSED, terminal_id=TERMINAL_ID,
                                    reason="followed"))
        for expected in ("#10 ", "#11 ", "#12 "):
            line = lines.get(timeout=30)  # polled every 0.5 s: a bound, not a timing check
            assert line.startswith(expected) and "(followed)" in line, line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None and proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


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


# --- tapgate journal salvage -----------------------------------------------------------------
def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def table_page_of(path: Path, entry_id: int) -> tuple[int, int]:
    """The page holding entry ``entry_id``'s row (its hash is stored nowhere else but in
    the next entry's prev_hash, on the same or the next page)."""
    db = sqlite3.connect(path)
    (value,) = db.execute("SELECT hash FROM entry WHERE id = ?", (entry_id,)).fetchone()
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    return path.read_bytes().index(value) // page_size, page_size


def salvage_setup(tmp_path: Path, n: int = 2000) -> tuple[Path, Path]:
    journal = tmp_path / "journal.db"
    build_journal(journal, n)
    assert not Path(f"{journal}-wal").exists()
    return journal, config_for(tmp_path, journal)


def test_salvage_recovers_all_but_a_damaged_page(tmp_path: Path) -> None:
    journal, config = salvage_setup(tmp_path)
    page, size = table_page_of(journal, 1000)
    with journal.open("r+b") as fh:  # a page in the middle of the file turns to garbage
        fh.seek(page * size)
        fh.write(os.urandom(size))
    before = digest(journal)
    broken = tapgate("journal", "verify", "--config", str(config))
    assert broken.returncode == 1
    assert "`tapgate journal salvage` copies out what can still be read" in broken.stderr

    out = tmp_path / "salvaged.db"
    done = tapgate("journal", "salvage", "--config", str(config), "--out", str(out))
    assert done.returncode == 1, done.stderr  # some entries are lost
    assert digest(journal) == before  # the damaged file untouched
    lines = done.stdout.splitlines()
    lost = [line for line in lines if line.startswith("lost: ")]
    assert len(lost) == 1, done.stdout
    # "lost: ids 990-1004 (15 entries): unreadable"
    first, last = (int(x) for x in lost[0].split()[2].split("-"))
    assert first <= 1000 <= last and last - first < 40
    assert lines[0] == (f"salvaged {2000 - (last - first + 1):,} of 2,000 entries "
                        f"(ids 1-2000) from {journal} into {out}")

    config2 = config_for(tmp_path, out, "salvaged.toml")
    check = tapgate("journal", "verify", "--config", str(config2))
    assert check.returncode == 1
    assert check.stdout.splitlines() == [
        f"FAULT entry {last + 1}: prev_hash breaks the chain",
        f"FAULT entry {last + 1}: follows {first - 1}, entries missing",
        f"{2000 - (last - first + 1)} entries, FAULTS FOUND",
    ], check.stdout
    exported = tapgate("journal", "export", "--config", str(config2))
    ids = [json.loads(line)["id"] for line in exported.stdout.splitlines()]
    assert ids == [*range(1, first), *range(last + 1, 2001)]
    # the terminal sequence goes on above anything the lost entries may have used
    db = sqlite3.connect(out)
    (seq,) = db.execute("SELECT value FROM meta WHERE key = 'max_terminal_seq'").fetchone()
    db.close()
    assert int(seq) >= 1000 + (last - first + 1)


@pytest.mark.parametrize("where", [0.5, 0.33, -5000])
def test_salvage_of_bytes_overwritten_blindly(tmp_path: Path, where: float) -> None:
    """Blind damage: whatever it hits (inner pages, the last pages), what salvage reports
    lost is what the salvaged journal lacks, and everything in it is intact."""
    journal, config = salvage_setup(tmp_path)
    size = journal.stat().st_size
    with journal.open("r+b") as fh:
        fh.seek(int(size * where) if where > 0 else size + int(where))
        fh.write(b"\xa5" * 3000)
    out = tmp_path / "salvaged.db"
    done = tapgate("journal", "salvage", "--config", str(config), "--out", str(out))
    assert done.returncode in (0, 1), done.stderr
    lines = done.stdout.splitlines()
    span = lines[0].split("(ids ")[1].split()[0].rstrip(")")
    first, last = (int(x) for x in span.split("-"))
    lost: set[int] = set()
    for line in lines:
        if line.startswith("lost: ids "):
            a, b = (int(x) for x in line.split()[2].split("-"))
            lost.update(range(a, b + 1))
        elif line.startswith("lost: id "):
            lost.add(int(line.split()[2]))
    db = sqlite3.connect(out)
    kept = [row[0] for row in db.execute("SELECT id FROM entry ORDER BY id")]
    db.close()
    assert first == 1 and sorted(set(kept) | lost) == list(range(1, last + 1))
    assert not set(kept) & lost
    assert (done.returncode == 0) == (last == 2000 and not lost)
    check = tapgate("journal", "verify", "--config",
                    str(config_for(tmp_path, out, "salvaged.toml")))
    faults = [line for line in check.stdout.splitlines() if line.startswith("FAULT")]
    assert not any("hash does not match" in line for line in faults)
    assert (check.returncode == 0) == (not lost), check.stdout


def test_salvage_of_an_intact_journal_copies_everything(tmp_path: Path) -> None:
    _, config = salvage_setup(tmp_path, 300)
    out = tmp_path / "copy.db"
    done = tapgate("journal", "salvage", "--config", str(config), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("salvaged all 300 entries (ids 1-300)")
    original = tapgate("journal", "export", "--config", str(config))
    copied = tapgate("journal", "export", "--config",
                     str(config_for(tmp_path, out, "copy.toml")))
    assert copied.stdout == original.stdout


def test_salvage_keeps_the_remote_management_state(tmp_path: Path) -> None:
    """The replay high-water, the deny list and remote config travel with the entries:
    a salvaged gate must not accept an old signed command again."""
    journal, config = salvage_setup(tmp_path, 50)
    with Journal(journal):  # migrated: the v5 tables exist; fill them as commands would
        pass
    db = sqlite3.connect(journal)
    db.execute("INSERT INTO command_seq VALUES ('00AABBCCDDEEFF00', 41)")
    db.execute("INSERT INTO deny_list VALUES (?)", (bytes.fromhex("8801000000000007"),))
    db.execute("INSERT INTO remote_config VALUES ('gate.anti_passback_s', '60')")
    db.execute("INSERT OR REPLACE INTO meta VALUES ('deny_list_version', '3')")
    db.commit()
    db.close()
    out = tmp_path / "copy.db"
    done = tapgate("journal", "salvage", "--config", str(config), "--out", str(out))
    assert done.returncode == 0, done.stderr
    with Journal(out) as copy:
        assert copy.last_command_seq("00AABBCCDDEEFF00") == 41
        assert copy.deny_list() == (3, frozenset({bytes.fromhex("8801000000000007")}))
        assert copy.remote_config() == {"gate.anti_passback_s": 60}


def test_salvage_reads_the_wal_of_a_journal_that_died(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    writer = Journal(gate / "journal.db").open()
    for n in range(50):
        writer.append(Draft(kind=KIND_REFUSAL, state=REFUSED, terminal_id=TERMINAL_ID,
                            reason=f"r{n}"))
    crashed = tmp_path / "crashed"  # the files as a power cut leaves them: WAL unmerged
    crashed.mkdir()
    for name in ("journal.db", "journal.db-wal"):
        (crashed / name).write_bytes((gate / name).read_bytes())
    writer.close()
    sums = {p.name: digest(p) for p in crashed.iterdir()}
    config = config_for(tmp_path, crashed / "journal.db")
    done = tapgate("journal", "salvage", "--config", str(config), "--out",
                   str(tmp_path / "new.db"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].startswith("salvaged all 50 entries (ids 1-50)")
    assert {p.name: digest(p) for p in crashed.iterdir()} == sums  # nothing merged, nothing added


def test_salvage_refuses_while_the_daemon_runs(tmp_path: Path) -> None:
    journal, config = salvage_setup(tmp_path, 10)
    running_board().write(journal.with_name("status.json"))
    done = tapgate("journal", "salvage", "--config", str(config), "--out",
                   str(tmp_path / "new.db"))
    assert done.returncode == 1
    assert done.stderr.startswith(f"tapgate: the daemon is running (pid {os.getpid()}, up ")
    assert not (tmp_path / "new.db").exists()


def test_salvage_needs_the_schema(tmp_path: Path) -> None:
    journal, config = salvage_setup(tmp_path, 100)
    with journal.open("r+b") as fh:  # page 1 holds the schema: nothing says where rows are
        fh.seek(100)
        fh.write(b"\xa5" * 3000)
    out = tmp_path / "new.db"
    done = tapgate("journal", "salvage", "--config", str(config), "--out", str(out))
    assert done.returncode == 1
    assert done.stderr.startswith(f"tapgate: cannot read the schema of {journal}")
    assert done.stderr.endswith("nothing can be salvaged\n")
    assert not out.exists()


def test_salvage_never_overwrites(tmp_path: Path) -> None:
    journal, config = salvage_setup(tmp_path, 10)
    out = tmp_path / "new.db"
    out.write_text("precious\n")
    done = tapgate("journal", "salvage", "--config", str(config), "--out", str(out))
    assert done.returncode == 1
    assert done.stderr.startswith(f"tapgate: {out} exists: salvage never overwrites")
    assert out.read_text() == "precious\n"
    done = tapgate("journal", "salvage", "--config", str(config), "--out", str(journal))
    assert done.returncode == 1 and "never overwrites" in done.stderr
    assert [p.name for p in tmp_path.iterdir() if ".salvage-" in p.name] == []


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


# --- tapgate config check --------------------------------------------------------------------
def test_config_check_prints_toml_that_loads_back(tmp_path: Path) -> None:
    raw = raw_config(tmp_path / "journal.db")
    raw["metrics"] = {"listen": "127.0.0.1:9464"}
    config = write_config(tmp_path / "tapgate.toml", raw)
    done = tapgate("config", "check", str(config), "--set", "gate.anti_passback_s=30")
    assert done.returncode == 0, done.stderr
    assert MASTER_KEY.hex().upper() not in done.stdout.upper()
    printed = tomllib.loads(done.stdout)
    assert printed["sam"]["purchase_key"] == "<masked>"
    assert printed["gate"]["anti_passback_s"] == 30.0
    assert printed["gate"]["fares"] == {"adult": 250, "concession": 120, "staff": 0}
    printed["sam"]["purchase_key"] = MASTER_KEY.hex()  # the secrets back in
    del printed["reader"]["sim_tac_key"]
    assert validate(printed) == validate(raw | {"gate": {**raw["gate"], "anti_passback_s": 30}})


def test_config_check_of_a_bad_file(tmp_path: Path) -> None:
    raw = raw_config()
    raw["gate"]["fare"] = -5
    done = tapgate("config", "check", str(write_config(tmp_path / "bad.toml", raw)))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("tapgate: config gate.fare = -5: must be between 0 and "
                           "4294967295\n")


# --- the status board and its writer ---------------------------------------------------------
def test_status_board() -> None:
    now = [1000.0]
    board = StatusBoard(terminal_id=TERMINAL_ID, reader_name="ACS ACR122U", pid=4242,
                        clock=lambda: now[0])
    changes: list[int] = []
    stop_listening = board.on_change(lambda: changes.append(1))
    snap = board.snapshot()
    assert (snap["pid"], snap["state"], snap["terminal_id"]) == (4242, "running", "000000A00001")
    assert snap["reader"] == {"name": "ACS ACR122U", "state": "starting"}
    assert snap["broker_link"] == snap["beacon"] == "not configured"
    assert snap["alarms"] == [] and snap["out_of_service"] is False
    assert set(snap["taps"]) == {o.value for o in Outcome} and not any(snap["taps"].values())

    board.set_reader_state(ReaderState.NO_READER)
    assert board.snapshot()["alarms"] == ["reader not connected"]
    board.set_reader_state(ReaderState.READY)
    board.set_reader_state(ReaderState.READY)  # no change: no listener call
    assert len(changes) == 2

    now[0] += 60
    board.note_tap(TapResult(Outcome.ACCEPTED, amount=250))
    board.note_tap(TapResult(Outcome.OUT_OF_SERVICE, "journal full"))
    snap = board.snapshot()
    assert snap["out_of_service"] is True and snap["alarms"] == ["out of service: journal full"]
    assert snap["taps"]["accepted"] == snap["taps"]["out_of_service"] == 1
    assert snap["last_tap_at"] == 1060.0 and snap["updated_at"] == 1060.0
    board.note_tap(TapResult(Outcome.TAP_AGAIN))  # proves nothing about the journal
    assert board.snapshot()["out_of_service"] is True
    board.note_tap(TapResult(Outcome.REFUSED, "card expired"))  # journalled: back in service
    assert board.snapshot()["out_of_service"] is False

    board.set_alarm("journal disk low", True)
    board.set_alarm("clock not synchronised", True)
    assert board.alarms == ["clock not synchronised", "journal disk low"]
    board.set_alarm("journal disk low", False)
    board.set_broker_link("connected to mqtt.example:8883")
    assert board.snapshot()["broker_link"] == "connected to mqtt.example:8883"
    stop_listening()
    calls = len(changes)
    board.set_alarm("x", True)
    assert len(changes) == calls


def test_status_file_round_trip_and_liveness(tmp_path: Path) -> None:
    path = tmp_path / "var" / "status.json"
    assert read_status(path) is None
    board = running_board()
    board.write(path)
    doc = read_status(path)
    assert doc is not None and doc == json.loads(path.read_text())
    assert liveness(doc, time.time(), 5.0).running
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["status.json"]
    path.write_text("{half a fi")
    assert read_status(path) is None


def test_status_writer_writes_periodically_atomically_and_last_as_stopped(
        tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    board = running_board()
    seen: list[float] = []
    torn: list[str] = []
    done = threading.Event()

    def watch() -> None:  # a reader as eager as can be: it must never see half a file
        while not done.is_set():
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            try:
                seen.append(json.loads(text)["updated_at"])
            except ValueError:
                torn.append(text)

    async def scenario() -> None:
        stop = asyncio.Event()
        probes: list[int] = []
        writer = asyncio.create_task(run_status_writer(
            board, path, 0.05, stop, probe=lambda: probes.append(1), min_gap_s=0.01))
        await asyncio.sleep(0.5)
        taps_before = read_status(path)
        for _ in range(200):  # a burst of taps from the card loop's thread
            await asyncio.to_thread(board.note_tap, TapResult(Outcome.ACCEPTED))
        await asyncio.sleep(0.2)
        assert taps_before is not None and taps_before["taps"]["accepted"] == 0
        latest = read_status(path)
        assert latest is not None and latest["taps"]["accepted"] == 200
        assert len(probes) >= 3
        stop.set()
        await asyncio.wait_for(writer, 5)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        asyncio.run(scenario())
    finally:
        done.set()
        watcher.join()
    assert not torn, torn[:3]
    assert len(set(seen)) >= 5  # rewritten again and again (interval 0.05 s over ~0.7 s)
    final = read_status(path)
    assert final is not None and final["state"] == "stopped"
    assert not liveness(final, time.time(), 5.0).running


def test_status_writer_survives_a_file_it_cannot_write(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "status.json"
    path.mkdir()  # a directory where the file should be: every replace fails

    async def scenario() -> None:
        stop = asyncio.Event()
        writer = asyncio.create_task(run_status_writer(running_board(), path, 0.02, stop))
        await asyncio.sleep(0.2)
        assert not writer.done()
        stop.set()
        await asyncio.wait_for(writer, 5)

    asyncio.run(scenario())
    warnings = [r for r in caplog.records if "cannot write the status file" in r.message]
    assert len(warnings) == 1  # said once, not at every turn
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temp files left


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
