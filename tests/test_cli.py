"""`tapgate` as an operator runs it: a separate process, its exit status and its output."""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.outcome import Outcome
from hal.card.model import Fault, FaultKind
from protocol.entry import ENTRY_FIELDS, GENESIS, chain_hash
from tests.cards import INS_DEBIT, MASTER_KEY
from tests.configs import raw_config, toml_text
from tests.rig import Rig

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".venv" / "bin" / "tapgate"
TAPGATE = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "daemon.cli"]


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TAPGATE_")}
    clean["PYTHONUNBUFFERED"] = "1"
    return clean


def tapgate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TAPGATE, *args], capture_output=True, text=True, timeout=60,
                          env=env(), cwd=cwd or ROOT, check=False)


def write_config(path: Path, raw: dict[str, dict[str, Any]]) -> Path:
    path.write_text(toml_text(raw), encoding="utf-8")
    return path


@pytest.fixture
def journal_config(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A config file and a journal with a few taps in it (a tear and its recovery too)."""
    rig = Rig(tmp_path / "gate")
    cards = [rig.card(n, 1000) for n in range(1, 4)]
    for card in cards:
        assert rig.tap(card).outcome is Outcome.ACCEPTED
    torn = rig.card(9, 1000)
    torn.inject(Fault(FaultKind.TEAR_AFTER, ins=INS_DEBIT))
    assert rig.tap(torn).torn
    assert rig.tap(torn).outcome is Outcome.RECOVERED
    assert rig.tap(rig.card(10, 10)).outcome is Outcome.REFUSED
    rig.close()
    yield write_config(tmp_path / "tapgate.toml", raw_config(rig.journal_path)), rig.journal_path


# --- journal verify / export ---------------------------------------------------------------
def test_journal_verify(journal_config: tuple[Path, Path]) -> None:
    config, _ = journal_config
    done = tapgate("journal", "verify", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["10 entries, chain intact"]


def test_journal_export(journal_config: tuple[Path, Path]) -> None:
    config, _ = journal_config
    done = tapgate("journal", "export", "--config", str(config))
    assert done.returncode == 0, done.stderr
    docs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [d["id"] for d in docs] == list(range(1, 11))
    assert [f"{d['kind']}/{d['state']}" for d in docs] == [
        "debit/intent", "debit/completed"] * 3 + [
        "debit/intent", "debit/torn", "recovery/recovered", "refusal/refused"]
    prev = GENESIS.hex().upper()
    for doc in docs:
        # the entry's fields, then where sync stands (outside the hash)
        assert list(doc) == [*ENTRY_FIELDS, "sync_state"]
        assert doc["sync_state"] == "pending"
        assert doc["prev_hash"] == prev  # the back office rechecks the chain from this
        assert chain_hash(doc).hex().upper() == doc["hash"]
        assert isinstance(doc["amount"], int)
        assert doc["terminal_id"] == "000000A00001"
        prev = doc["hash"]
    completed = docs[1]
    assert (completed["amount"], completed["balance_before"], completed["balance_after"]) == (
        250, 1000, 750)
    assert completed["card_serial"] == "8801000000000001"
    assert len(completed["mac2"]) == 8 and len(completed["tac"]) == 8
    assert completed["tac"] == completed["tac"].upper()
    recovered = docs[8]
    assert recovered["ref"] == docs[7]["id"] and recovered["tac"] is not None


def test_journal_verify_fails_on_a_tampered_journal(journal_config: tuple[Path, Path]) -> None:
    config, path = journal_config
    db = sqlite3.connect(path)
    db.execute("UPDATE entry SET balance_after = 999 WHERE id = 2")
    db.commit()
    db.close()
    done = tapgate("journal", "verify", "--config", str(config))
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["FAULT entry 2: hash does not match its content",
                                        "10 entries, FAULTS FOUND"]


def test_journal_verify_fails_on_a_deleted_entry(journal_config: tuple[Path, Path]) -> None:
    config, path = journal_config
    db = sqlite3.connect(path)
    db.execute("DELETE FROM entry WHERE id = 5")
    db.commit()
    db.close()
    done = tapgate("journal", "verify", "--config", str(config))
    assert done.returncode == 1
    assert "FAULT entry 6: follows 4, entries missing" in done.stdout.splitlines()


def test_journal_commands_need_an_existing_journal(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "journal.db"
    config = write_config(tmp_path / "tapgate.toml", raw_config(missing))
    for command in ("verify", "export"):
        done = tapgate("journal", command, "--config", str(config))
        assert done.returncode == 1
        assert f"no journal at {missing}" in done.stderr
    assert not missing.parent.exists()  # nothing created on the way


def test_journal_verify_refuses_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    path.write_text("not a journal\n")
    config = write_config(tmp_path / "tapgate.toml", raw_config(path))
    done = tapgate("journal", "verify", "--config", str(config))
    assert done.returncode == 1 and "not an SQLite journal" in done.stderr
    assert path.read_text() == "not a journal\n"


# --- a broken config -----------------------------------------------------------------------
def broken(tmp_path: Path, change: Any) -> tuple[Path, Path]:
    journal = tmp_path / "var" / "journal.db"
    raw = raw_config(journal)
    change(raw)
    return write_config(tmp_path / "tapgate.toml", raw), journal


def _set(section: str, key: str, value: Any) -> Any:
    return lambda raw: raw[section].__setitem__(key, value)


def _drop_fares(raw: dict[str, dict[str, Any]]) -> None:
    del raw["gate"]["fares"]


@pytest.mark.parametrize("change, expected", [
    (_set("gate", "terminal_id", "00000GA00001"),
     "config gate.terminal_id = '00000GA00001': must be 12 hex digits"),
    (_set("gate", "terminal_id", "A00001"),
     "config gate.terminal_id = 'A00001': must be 12 hex digits, not 6"),
    (_set("gate", "colour", "red"), "config gate.colour = 'red': unknown key"),
    (_drop_fares, "config gate.fare = None: set gate.fare or a [gate.fares] table"),
    (_set("gate", "anti_passback_s", "soon"),
     "config gate.anti_passback_s = 'soon': must be a number"),
    (_set("gate", "fare", -5), "config gate.fare = -5: must be between 0 and 4294967295"),
    (_set("reader", "backend", "nfc"), "config reader.backend = 'nfc': must be one of sim, pcsc"),
    (_set("log", "level", "LOUD"), "config log.level = 'LOUD': must be DEBUG, INFO, WARNING"),
])
def test_run_refuses_a_broken_config(tmp_path: Path, change: Any, expected: str) -> None:
    config, journal = broken(tmp_path, change)
    done = tapgate("run", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.startswith("tapgate: " + expected), done.stderr
    assert done.stdout == ""
    assert not journal.exists()  # refused before anything was touched


def key_file(tmp_path: Path, mode: int, text: str = MASTER_KEY.hex()) -> Path:
    path = tmp_path / "purchase.key"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def _with_key_file(path: Path) -> Any:
    def change(raw: dict[str, dict[str, Any]]) -> None:
        raw["sam"] = {"backend": "software", "key_file": str(path)}
    return change


@pytest.mark.parametrize("make, why", [
    (lambda d: key_file(d, 0o644), "is readable by others (mode 0644); chmod 600 it"),
    (lambda d: key_file(d, 0o640), "is readable by others (mode 0640); chmod 600 it"),
    (lambda d: d / "missing.key", "cannot be read: No such file or directory"),
    (lambda d: d, "cannot be read: Is a directory"),
    (lambda d: key_file(d, 0o600, "not hex"), "must hold 32 hex digits"),
    (lambda d: key_file(d, 0o600, "0011"), "must hold 32 hex digits (AES-128)"),
])
def test_run_refuses_a_bad_key_file(tmp_path: Path, make: Any, why: str) -> None:
    path = make(tmp_path)
    config, journal = broken(tmp_path, _with_key_file(path))
    done = tapgate("run", "--config", str(config))
    assert done.returncode == 2
    assert f"tapgate: config sam.key_file = '{path}': {why}" in done.stderr, done.stderr
    assert not journal.exists()


def test_run_refuses_a_missing_or_invalid_file(tmp_path: Path) -> None:
    done = tapgate("run", "--config", str(tmp_path / "nope.toml"))
    assert done.returncode == 2 and "no such file" in done.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[gate\nfare = 1\n")
    done = tapgate("run", "--config", str(bad))
    assert done.returncode == 2 and "is not valid TOML" in done.stderr


def test_set_overrides_are_validated(tmp_path: Path) -> None:
    config = write_config(tmp_path / "tapgate.toml", raw_config(tmp_path / "j.db"))
    done = tapgate("run", "--config", str(config), "--set", "gate.anti_passback_s=-1")
    assert done.returncode == 2
    assert "config gate.anti_passback_s = -1: must be between 0 and 604800" in done.stderr
    done = tapgate("run", "--config", str(config), "--set", "nodot=1")
    assert done.returncode == 2  # argparse's own usage error


def test_config_check(tmp_path: Path) -> None:
    done = tapgate("config", "check", str(ROOT / "config" / "tapgate.toml"))
    assert done.returncode == 0, done.stderr
    assert 'terminal_id = "000000A00001"' in done.stdout.splitlines()
    assert 'purchase_key = "<masked>"' in done.stdout.splitlines()
    assert MASTER_KEY.hex().upper() not in done.stdout.upper()


# --- the daemon on its simulator -----------------------------------------------------------
def test_run_on_the_simulator_and_stop_on_sigterm(tmp_path: Path) -> None:
    journal = tmp_path / "var" / "journal.db"
    proc = subprocess.Popen(
        [*TAPGATE, "run", "--config", str(ROOT / "config" / "tapgate.toml"),
         "--set", f'journal.path="{journal}"', "--set", "reader.sim_interval_s=0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), cwd=tmp_path)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    taps: list[str] = []
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 30  # a bound against hanging, not a timing check
        while len(taps) < 3 and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            seen.append(line)
            if "tapgate.tap: tap 8801" in line:
                taps.append(line)
        assert len(taps) >= 3, "\n".join(seen)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    while (line := lines.get_nowait() if not lines.empty() else None) is not None:
        seen.append(line)
    assert any(line.endswith("tapgate: stopped cleanly") for line in seen), "\n".join(seen)
    assert all(" ms]" in t for t in taps)

    config = write_config(tmp_path / "check.toml", raw_config(journal))
    done = tapgate("journal", "verify", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.endswith("chain intact\n")
    assert int(done.stdout.split()[0]) >= 3
