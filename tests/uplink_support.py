"""What the uplink tests share: a stand-in for the head-end, a watch on a gate's status,
the uplink run in a thread, and the fixtures for a stand-in and a gate's journal (the real
daemon as a subprocess is tests/daemon_process.py).

The stand-in head-end is written for these tests (a paho subscriber that stores entries
by uuid, first arrival wins, and acks per protocol.contract after storing); the real
one is headend/ and has tests of its own. Each test uses a gate id of its own
(:func:`new_gate_id`).

tests/conftest.py registers this module as a plugin: its fixtures serve every
test_uplink*.py module.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.config import MqttConfig
from daemon.journal import Journal
from daemon.sync.uplink import Uplink
from protocol import contract
from protocol.entry import Draft, chain_hash
from tests.drafts import refusal
from tests.fixtures.mosquitto import Mosquitto
from tests.waiting import TIMEOUT_S, wait_until

_gate_numbers = itertools.count(1)
_standins = itertools.count(1)


def new_gate_id() -> str:
    return f"0000C{os.getpid() % 0xFFFF:04X}{next(_gate_numbers):03X}"


def refusals(terminal_id: bytes, n: int, tag: str = "") -> list[Draft]:
    return [refusal(f"test {tag}{i}", serial=None, terminal_id=terminal_id) for i in range(n)]


def _properties() -> Properties:
    return Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


# --- the stand-ins -------------------------------------------------------------------------
class HeadEnd:
    """Stores every gate's entries once (by uuid), then acks the batch on its response
    topic with its correlation data. ``hold()``: take batches in but neither store nor
    ack them until ``release()``."""

    def __init__(self, broker: Mosquitto, name: str = "standin",
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        self.lock = threading.Lock()
        self.arrivals: list[str] = []  # every uuid as it came, duplicates included
        self.stored: dict[str, dict[str, Any]] = {}  # uuid -> entry, first arrival
        self.order: dict[str, list[str]] = {}  # gate -> uuids in first-arrival order
        self.batches: list[tuple[contract.Batch, str, bytes]] = []  # batch, resp., corr.
        self.ack_delay_s = 0.0
        self._held: list[mqtt.MQTTMessage] = []
        self._holding = False
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=f"{name}-{os.getpid()}-{next(_standins)}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.5)
        if tls is not None:
            self.client.tls_set(ca_certs=str(tls[0]), certfile=str(tls[1]), keyfile=str(tls[2]))
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600  # queued for us while we reconnect
        self.client.connect_async(broker.host, broker.port, clean_start=False, properties=props)
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.loop_start()
        assert self.subscribed.wait(TIMEOUT_S), "the stand-in head-end did not subscribe"

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(contract.tx_topic("+"), qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            if self._holding:
                self._held.append(msg)
                self._record(msg)
                return
        self._store_and_ack(msg)

    def _record(self, msg: mqtt.MQTTMessage) -> contract.Batch:
        batch = contract.Batch.decode(bytes(msg.payload))
        props = msg.properties
        self.batches.append((batch, getattr(props, "ResponseTopic", ""),
                             bytes(getattr(props, "CorrelationData", b""))))
        return batch

    def _store_and_ack(self, msg: mqtt.MQTTMessage, *, recorded: bool = False) -> None:
        if self.ack_delay_s:
            time.sleep(self.ack_delay_s)
        with self.lock:
            batch = contract.Batch.decode(bytes(msg.payload)) if recorded else self._record(msg)
            for entry in batch.entries:
                self.arrivals.append(entry["uuid"])
                if entry["uuid"] not in self.stored:
                    self.stored[entry["uuid"]] = entry
                    self.order.setdefault(batch.gate, []).append(entry["uuid"])
        assert msg.properties is not None
        props = _properties()
        props.CorrelationData = msg.properties.CorrelationData
        ack = contract.Ack(batch.batch_id, [e["uuid"] for e in batch.entries])
        self.client.publish(msg.properties.ResponseTopic, ack.encode(), qos=1, properties=props)

    def hold(self) -> None:
        with self.lock:
            self._holding = True

    def release(self) -> None:
        with self.lock:
            self._holding = False
            held, self._held = self._held, []
        for msg in held:
            self._store_and_ack(msg, recorded=True)

    def received_batches(self) -> int:
        with self.lock:
            return len(self.batches)

    def uuids_of(self, gate: str) -> list[str]:
        with self.lock:
            return list(self.order.get(gate, []))

    def chain_problems(self, gate: str) -> list[str]:
        """What a back office checks: each entry's hash, and that each continues the last."""
        problems, prev = [], None
        for uuid in self.uuids_of(gate):
            entry = self.stored[uuid]
            if chain_hash(entry).hex().upper() != entry["hash"]:
                problems.append(f"entry {entry['id']}: hash")
            if prev is not None and entry["prev_hash"] != prev["hash"]:
                problems.append(f"entry {entry['id']}: does not continue {prev['id']}")
            prev = entry
        return problems

    def close(self) -> None:
        props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0  # the broker forgets it: nothing queues up for it
        self.client.disconnect(properties=props)
        self.client.loop_stop()


class StatusWatch:
    """Every status message of one gate, retained ones included."""

    def __init__(self, broker: Mosquitto, gate: str) -> None:
        self.seen: list[tuple[contract.Status, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(contract.status_topic(gate), qos=1)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.connect_async(broker.host, broker.port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.seen.append((contract.Status.decode(bytes(msg.payload)), bool(msg.retain)))

    def last(self) -> contract.Status | None:
        with self._lock:
            return self.seen[-1][0] if self.seen else None

    def wait_state(self, state: str, what: str) -> contract.Status:
        wait_until(lambda: (s := self.last()) is not None and s.state == state, what)
        status = self.last()
        assert status is not None
        return status

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_status(broker: Mosquitto, gate: str) -> tuple[contract.Status, bool]:
    """What a newcomer is told about the gate: the retained status."""
    watch = StatusWatch(broker, gate)
    try:
        wait_until(lambda: bool(watch.seen), "the retained status")
        with watch._lock:
            return watch.seen[0]
    finally:
        watch.close()


@pytest.fixture
def headend(mosquitto: Mosquitto) -> Iterator[HeadEnd]:
    standin = HeadEnd(mosquitto)
    yield standin
    standin.close()


def booted_just_now(uptime_s: float = 5.0) -> Callable[[], float]:
    """A monotonic clock that reads ``uptime_s`` now and runs as time.monotonic does:
    the machine just booted (a Pi after a power cut, a fresh CI machine), whatever this
    one's uptime."""
    offset = uptime_s - time.monotonic()
    return lambda: time.monotonic() + offset


def mqtt_config(broker: Mosquitto, **changes: Any) -> MqttConfig:
    values: dict[str, Any] = {"host": broker.host, "port": broker.port, "batch_size": 20,
                              "window": 3, "reconnect_min_s": 0.05, "reconnect_max_s": 0.5,
                              "ack_timeout_s": 5.0, "status_interval_s": 0.5}
    values.update(changes)
    return MqttConfig(**values)


@contextmanager
def running(uplink: Uplink) -> Iterator[Uplink]:
    stop = threading.Event()
    thread = threading.Thread(target=uplink.run, args=(stop,), name="uplink")
    thread.start()
    try:
        yield uplink
    finally:
        stop.set()
        uplink.notify()
        thread.join(TIMEOUT_S)
        assert not thread.is_alive(), "the uplink did not stop"


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[tuple[str, Journal]]:
    gate_id = new_gate_id()
    with Journal(tmp_path / "journal.db") as journal:
        yield gate_id, journal


def journal_uuids(journal: Journal) -> list[str]:
    return [e.uuid for e in journal.entries()]
