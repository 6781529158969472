"""`tapgate status`, `tapgate journal tail` and `tapgate config check` as an operator
runs them: a separate process, its exit status, its output. Plus the status board and
its writer, which the daemon runs and `status` reads.

Journal export, verify and keygen are in test_operator_cli_journal.py, salvage in
test_operator_cli_salvage.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import stat
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import validate
from daemon.journal import Journal
from daemon.outcome import Outcome, TapResult
from daemon.status import StatusBoard, liveness, read_status, run_status_writer
from hal.card.model import Fault, FaultKind
from hal.reader.base import ReaderState
from protocol.entry import KIND_REFUSAL, REFUSED, Draft
from tests.cards import INS_DEBIT, MASTER_KEY, TERMINAL_ID
from tests.configs import raw_config
from tests.operator_cli_support import (
    ROOT,
    TAPGATE,
    config_for,
    env,
    running_board,
    tapgate,
    write_config,
)
from tests.rig import Rig


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


# --- tapgate journal tail --------------------------------------------------------------------
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
