"""The uplink through outages of the broker and deaths of the gate, against a real
mosquitto and the stand-in head-end of tests/uplink_support.py: nothing is lost, every
entry reaches the head-end once and in order; the real daemon's status is retained and
carries what the operator needs, its Last Will says offline.

The drain itself is in test_uplink_drain.py, the [mqtt] settings and TLS in
test_uplink_config.py.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.journal import Journal
from daemon.sync.uplink import Uplink
from protocol import contract
from tests.configs import raw_config, toml_text
from tests.daemon_process import Daemon
from tests.fixtures.mosquitto import Mosquitto
from tests.uplink_support import (
    HeadEnd,
    StatusWatch,
    journal_uuids,
    mqtt_config,
    new_gate_id,
    refusals,
    retained_status,
    running,
)
from tests.waiting import TIMEOUT_S, wait_until


# --- outages -------------------------------------------------------------------------------
def test_broker_outage_while_taps_go_on_loses_nothing(
        make_broker: Callable[..., Mosquitto], gate: tuple[str, Journal]) -> None:
    broker = make_broker()
    standin = HeadEnd(broker)
    gate_id, journal = gate
    terminal = bytes.fromhex(gate_id)
    uplink = Uplink(config=mqtt_config(broker, ack_timeout_s=2.0), gate_id=gate_id,
                    journal=journal)
    stop_taps = threading.Event()
    taps = {"total": 0, "during_outage": 0}
    outage = threading.Event()

    def card_loop() -> None:  # the journal's writer: it never waits for the network
        n = 0
        while not stop_taps.is_set():
            journal.append(refusals(terminal, 1, f"tap{n}-")[0])
            uplink.notify()
            n += 1
            taps["total"] = n
            if outage.is_set():
                taps["during_outage"] += 1
            time.sleep(0.003)

    writer = threading.Thread(target=card_loop, name="card-loop")
    try:
        with running(uplink):
            writer.start()
            wait_until(lambda: len(standin.uuids_of(gate_id)) >= 100, "the first entries")
            broker.stop()
            outage.set()
            wait_until(lambda: taps["during_outage"] >= 200, "taps during the outage")
            wait_until(lambda: not uplink.connected, "the uplink to see the outage")
            broker.start()
            outage.clear()
            backlog = taps["total"]
            wait_until(lambda: uplink.connected, "the uplink to reconnect")
            wait_until(lambda: len(standin.uuids_of(gate_id)) >= backlog,
                       "the backlog to drain while taps go on")
            assert taps["total"] > backlog
            stop_taps.set()
            writer.join(TIMEOUT_S)
            wait_until(lambda: journal.pending_sync_count() == 0, "the last entries")
    finally:
        stop_taps.set()
        standin.close()
    assert uplink.stats.connects >= 2
    assert standin.uuids_of(gate_id) == journal_uuids(journal)  # all, once, in order
    assert standin.chain_problems(gate_id) == []
    assert journal.verify().ok


# --- the real daemon -----------------------------------------------------------------------
def daemon_config(tmp_path: Path, gate_id: str, broker: Mosquitto, *,
                  tap_interval_s: float, **mqtt: Any) -> Path:
    raw = raw_config(tmp_path / "journal.db")
    raw["gate"]["terminal_id"] = gate_id
    raw["gate"]["anti_passback_s"] = 0
    raw["reader"] = {"backend": "sim", "sim_interval_s": tap_interval_s, "sim_cards": 4,
                     "sim_tear_rate": 0.2}
    raw["mqtt"] = {"host": broker.host, "port": broker.port, "batch_size": 20, "window": 2,
                   "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "ack_timeout_s": 5.0,
                   "status_interval_s": 0.5, **mqtt}
    path = tmp_path / f"tapgate-{tap_interval_s}.toml"
    path.write_text(toml_text(raw), encoding="utf-8")
    return path


def pending_on_disk(journal: Path) -> tuple[int, int]:
    """(entries, not yet acknowledged) as the daemon's journal holds them now."""
    db = sqlite3.connect(journal, timeout=10)
    try:
        return db.execute("SELECT COUNT(*), COUNT(*) - COUNT(acked_ms) FROM entry").fetchone()
    finally:
        db.close()


def test_gate_sigkilled_mid_drain_loses_nothing_and_its_will_says_offline(
        tmp_path: Path, mosquitto: Mosquitto, headend: HeadEnd) -> None:
    gate_id = new_gate_id()
    journal_path = tmp_path / "journal.db"
    with Journal(journal_path) as journal:  # a gate that was offline a long time
        journal.append_many(refusals(bytes.fromhex(gate_id), 3000, "backlog"))
    watch = StatusWatch(mosquitto, gate_id)
    headend.ack_delay_s = 0.005  # a head-end that takes its time: the drain is caught mid-way
    try:
        daemon = Daemon(daemon_config(tmp_path, gate_id, mosquitto, tap_interval_s=0.05))
        daemon.wait_log("tapgate running")
        online = watch.wait_state(contract.ONLINE, "the online status")
        assert online.telemetry["version"] and "taps" in online.telemetry
        wait_until(lambda: len(headend.uuids_of(gate_id)) >= 500, "the drain to be under way")
        assert pending_on_disk(journal_path)[1] > 0
        daemon.kill()
        offline = watch.wait_state(contract.OFFLINE, "the Last Will")
        assert offline.telemetry.get("reason") == "connection lost"
        status, retained = retained_status(mosquitto, gate_id)
        assert retained and status.state == contract.OFFLINE

        headend.ack_delay_s = 0
        daemon = Daemon(daemon_config(tmp_path, gate_id, mosquitto, tap_interval_s=0.05))
        daemon.wait_log("tapgate running")
        watch.wait_state(contract.ONLINE, "online again")
        daemon.wait_log(" tapgate.tap: tap ", 5)  # taps go on while the backlog drains
        wait_until(lambda: pending_on_disk(journal_path)[1] < 10, "the backlog to drain")
        assert daemon.stop() == 0
        assert watch.wait_state(contract.OFFLINE, "offline on stop").telemetry == {
            "reason": "stopped"}

        # what the taps wrote in the last moments goes with the next start (no demo taps)
        daemon = Daemon(daemon_config(tmp_path, gate_id, mosquitto, tap_interval_s=0))
        daemon.wait_log("tapgate running")
        wait_until(lambda: pending_on_disk(journal_path)[1] == 0, "the last entries")
        assert daemon.stop() == 0
    finally:
        watch.close()

    with Journal(journal_path) as journal:
        uuids = journal_uuids(journal)
        assert journal.verify().ok
    assert len(uuids) > 3000
    assert headend.uuids_of(gate_id) == uuids  # every entry once, in the journal's order
    assert headend.chain_problems(gate_id) == []
    # what was in flight at the kill came again; the head-end stored it once
    assert len(headend.arrivals) >= len(uuids)


def test_broker_dead_at_start_the_gate_takes_taps_and_drains_later(
        tmp_path: Path, make_broker: Callable[..., Mosquitto]) -> None:
    broker = make_broker(start=False)
    gate_id = new_gate_id()
    journal_path = tmp_path / "journal.db"
    notify_dir = Path(tempfile.mkdtemp(prefix="tg-uplink-"))  # AF_UNIX paths are short
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_dir / "notify"))
    notify.settimeout(TIMEOUT_S)
    standin: HeadEnd | None = None
    try:
        daemon = Daemon(daemon_config(tmp_path, gate_id, broker, tap_interval_s=0.05),
                        env={"NOTIFY_SOCKET": str(notify_dir / "notify")})
        while b"READY=1" not in notify.recv(4096):
            pass
        daemon.wait_log("tapgate running")
        daemon.wait_log(" tapgate.tap: tap ", 10)
        written, pending = pending_on_disk(journal_path)
        assert written == pending > 0  # nothing could be synced

        broker.start()
        standin = HeadEnd(broker)
        wait_until(lambda: len(standin.uuids_of(gate_id)) >= written, "the drain")
        assert daemon.stop() == 0
        daemon = Daemon(daemon_config(tmp_path, gate_id, broker, tap_interval_s=0))
        # (the first run may have drained it all: a SIGTERM before the daemon is up would
        # find no handler yet)
        daemon.wait_log("tapgate running")
        wait_until(lambda: pending_on_disk(journal_path)[1] == 0, "the last entries")
        assert daemon.stop() == 0
        with Journal(journal_path) as journal:
            uuids = journal_uuids(journal)
        assert standin.uuids_of(gate_id) == uuids
        assert standin.chain_problems(gate_id) == []
    finally:
        notify.close()
        shutil.rmtree(notify_dir, ignore_errors=True)
        if standin is not None:
            standin.close()


def test_status_telemetry_is_retained_and_carries_what_the_operator_needs(
        tmp_path: Path, mosquitto: Mosquitto, headend: HeadEnd) -> None:
    gate_id = new_gate_id()
    daemon = Daemon(daemon_config(tmp_path, gate_id, mosquitto, tap_interval_s=0.05,
                                  disk_alarm_pct=1))  # any disk is fuller than 1 %
    daemon.wait_log(" tapgate.tap: tap ", 5)
    watch = StatusWatch(mosquitto, gate_id)
    try:
        wait_until(lambda: (s := watch.last()) is not None
                   and sum(s.telemetry.get("taps", {}).values()) >= 5, "telemetry with taps")
        status = watch.last()
    finally:
        watch.close()
    assert status is not None and status.state == contract.ONLINE
    telemetry = status.telemetry
    for key in ("version", "uptime_s", "taps", "pending_sync", "pending_recoveries",
                "reader", "journal", "alarms", "uplink"):
        assert key in telemetry, key
    assert set(telemetry["taps"]) >= {"accepted", "refused", "recovered", "tap_again"}
    assert telemetry["reader"] == "ready"
    assert "disk" in telemetry["alarms"]
    assert json.loads(json.dumps(telemetry)) == telemetry
    assert daemon.stop() == 0
