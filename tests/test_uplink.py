"""The uplink against a real mosquitto: the journal drains to the head-end in order, every
entry once, synced only when the head-end's ack names it; outages of the broker and
deaths of the gate lose nothing; the status is retained, the Last Will says offline.

The head-end here is a stand-in written for these tests (a paho subscriber that stores
entries by uuid, first arrival wins, and acks per daemon.sync.contract after storing);
the real one is headend/ and has tests of its own. Each test uses a gate id of its own.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
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

from daemon.config import MqttConfig, validate
from daemon.errors import ConfigError, SyncError
from daemon.journal import Draft, Journal
from daemon.journal.entry import KIND_REFUSAL, REFUSED, chain_hash
from daemon.metrics import journal_gauges
from daemon.sync import contract
from daemon.sync.retention import prune_once
from daemon.sync.uplink import Uplink
from tests.fixtures.mosquitto import Mosquitto
from tests.helpers import raw_config, toml_text

TIMEOUT_S = 60.0  # only a broken uplink gets near it; nothing here is timed
_gate_numbers = itertools.count(1)
_standins = itertools.count(1)


def new_gate_id() -> str:
    return f"0000C{os.getpid() % 0xFFFF:04X}{next(_gate_numbers):03X}"


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def refusals(terminal_id: bytes, n: int, tag: str = "") -> list[Draft]:
    return [Draft(kind=KIND_REFUSAL, state=REFUSED, terminal_id=terminal_id,
                  reason=f"test {tag}{i}") for i in range(n)]


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


# --- config --------------------------------------------------------------------------------
def test_mqtt_config_defaults_to_no_uplink_and_the_gate_id() -> None:
    config = validate(raw_config())
    assert not config.mqtt.enabled
    assert config.gate.gate_id == "000000A00001"
    raw = raw_config()
    raw["mqtt"] = {"host": "broker.example", "tls_ca": "/etc/ca.pem"}
    mqtt_cfg = validate(raw).mqtt
    assert mqtt_cfg.enabled and mqtt_cfg.uses_tls and mqtt_cfg.port == 1883
    assert (mqtt_cfg.batch_size, mqtt_cfg.window, mqtt_cfg.retention_days) == (100, 4, 30)
    assert Uplink(config=mqtt_cfg, gate_id="000000A00001",
                  journal=None).client_id == "000000A00001"  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "value", "why"), [
    ("port", 0, "between 1 and 65535"),
    ("port", "1883", "whole number"),
    ("host", "two words", "host name"),
    ("client_id", "a/b", "letters, digits"),
    ("batch_size", 0, "between 1 and"),
    ("window", 1000, "between 1 and 64"),
    ("keepalive_s", 1, "between 5 and"),
    ("retention_days", -1, "between"),
    ("tls", "yes", "true or false"),
    ("tls_cert", "/etc/gate.pem", "both mqtt.tls_cert and mqtt.tls_key"),
    ("reconnect_max_s", 0.1, "not be below mqtt.reconnect_min_s"),
    ("colour", "blue", "unknown key"),
])
def test_bad_mqtt_config_names_the_key_the_value_and_why(key: str, value: Any,
                                                          why: str) -> None:
    raw = raw_config()
    raw["mqtt"] = {"host": "broker.example", key: value}
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert err.value.key == f"mqtt.{key}" and err.value.value == value
    assert why in err.value.why


# --- draining ------------------------------------------------------------------------------
def test_normal_drain_sends_every_entry_once_in_order_and_all_get_acked(
        mosquitto: Mosquitto, headend: HeadEnd, gate: tuple[str, Journal]) -> None:
    gate_id, journal = gate
    terminal = bytes.fromhex(gate_id)
    journal.append_many(refusals(terminal, 237))
    uplink = Uplink(config=mqtt_config(mosquitto), gate_id=gate_id, journal=journal,
                    telemetry=lambda: {"pending_sync": journal.pending_sync_count()})
    with running(uplink):
        wait_until(lambda: journal.pending_sync_count() == 0, "the backlog to drain")
        for _ in range(5):  # and what the card loop writes meanwhile
            journal.append(refusals(terminal, 1, "live")[0])
            uplink.notify()
        wait_until(lambda: journal.pending_sync_count() == 0, "the new entries to drain")
        status, retained = retained_status(mosquitto, gate_id)

    assert headend.uuids_of(gate_id) == journal_uuids(journal)
    assert sorted(headend.arrivals) == sorted(journal_uuids(journal))  # each exactly once
    assert headend.chain_problems(gate_id) == []
    assert journal_gauges(journal, time.time()).pending_sync == 0
    assert uplink.stats.entries_acked == 242 and uplink.stats.resends == 0
    for batch, response_topic, correlation in headend.batches:
        assert batch.gate == gate_id and 0 < len(batch.entries) <= 20
        assert response_topic == contract.ack_topic(gate_id)
        assert correlation == batch.batch_id.encode()
    ids = [e["id"] for batch, _, _ in headend.batches for e in batch.entries]
    assert ids == sorted(ids)
    assert retained and status.state == contract.ONLINE and status.gate == gate_id
    assert "pending_sync" in status.telemetry and "uplink" in status.telemetry


def test_the_window_bounds_what_is_in_flight(mosquitto: Mosquitto, headend: HeadEnd,
                                             gate: tuple[str, Journal]) -> None:
    """With the head-end silent, no more than the window goes out: the backlog waits in
    the journal, not in paho's queue."""
    gate_id, journal = gate
    journal.append_many(refusals(bytes.fromhex(gate_id), 500))
    headend.hold()
    uplink = Uplink(config=mqtt_config(mosquitto, batch_size=10, window=3, ack_timeout_s=600),
                    gate_id=gate_id, journal=journal)
    with running(uplink):
        wait_until(lambda: headend.received_batches() >= 3, "the first window")
        time.sleep(1.0)  # room to overshoot, were the window not kept
        assert headend.received_batches() == 3
        assert uplink.stats.entries_sent == 30 and journal.pending_sync_count() == 500
        headend.release()
        wait_until(lambda: journal.pending_sync_count() == 0, "the drain after release")
    assert headend.uuids_of(gate_id) == journal_uuids(journal)


def test_an_entry_is_synced_only_by_an_ack_naming_it_in_a_batch_the_gate_sent(
        mosquitto: Mosquitto, headend: HeadEnd, gate: tuple[str, Journal]) -> None:
    gate_id, journal = gate
    entries = journal.append_many(refusals(bytes.fromhex(gate_id), 30))
    headend.hold()
    uplink = Uplink(config=mqtt_config(mosquitto, batch_size=10, window=1, ack_timeout_s=600),
                    gate_id=gate_id, journal=journal)
    forger = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    forger.connect(mosquitto.host, mosquitto.port)
    forger.loop_start()
    ack_topic = contract.ack_topic(gate_id)
    try:
        with running(uplink):
            wait_until(lambda: headend.received_batches() == 1, "the first batch")
            first, _, _ = headend.batches[0]
            others = [e.uuid for e in entries[10:]]
            for payload in (b"\xff not json", b"[]", b'{"stored": 5}',
                            contract.Ack("no-such-batch", others).encode(),
                            contract.Ack(first.batch_id, others).encode()):  # not in it
                forger.publish(ack_topic, payload, qos=1).wait_for_publish(TIMEOUT_S)
            time.sleep(0.5)
            assert journal.pending_sync_count() == 30
            # a PUBACK from the broker is no ack either: the batch is at the broker
            assert uplink.stats.entries_acked == 0
            headend.release()
            wait_until(lambda: journal.pending_sync_count() == 0, "the drain")
    finally:
        forger.disconnect()
        forger.loop_stop()
    assert headend.uuids_of(gate_id) == journal_uuids(journal)


def test_overdue_acks_resend_from_the_journal_ever_less_often(
        mosquitto: Mosquitto, headend: HeadEnd, gate: tuple[str, Journal]) -> None:
    """A head-end that is away gets the window again, but not every ack timeout: the
    wait doubles (0.2, 0.4, 0.8 ... s here), so its queue at the broker stays small."""
    gate_id, journal = gate
    journal.append_many(refusals(bytes.fromhex(gate_id), 40))
    headend.hold()
    uplink = Uplink(config=mqtt_config(mosquitto, batch_size=10, window=1, ack_timeout_s=0.2),
                    gate_id=gate_id, journal=journal)
    with running(uplink):
        time.sleep(2.5)  # every 0.2 s would be a dozen copies
        copies = headend.received_batches()
        assert 2 <= copies <= 5, copies
        assert {tuple(e["uuid"] for e in b.entries) for b, _, _ in headend.batches} == {
            tuple(e.uuid for e in journal.unacked(0, 10))}  # always the first, again
        headend.release()
        wait_until(lambda: journal.pending_sync_count() == 0, "the drain")
    assert headend.uuids_of(gate_id) == journal_uuids(journal)


def test_a_partial_ack_leaves_the_rest_pending_and_it_is_sent_again(
        mosquitto: Mosquitto, gate: tuple[str, Journal]) -> None:
    gate_id, journal = gate
    entries = journal.append_many(refusals(bytes.fromhex(gate_id), 10))
    refused = entries[4].uuid
    seen: list[list[str]] = []

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        batch = contract.Batch.decode(bytes(msg.payload))
        uuids = [e["uuid"] for e in batch.entries]
        seen.append(uuids)
        stored = [u for u in uuids if u != refused or len(seen) > 1]  # stores it next time
        assert msg.properties is not None
        props = _properties()
        props.CorrelationData = msg.properties.CorrelationData
        client.publish(msg.properties.ResponseTopic,
                       contract.Ack(batch.batch_id, stored, {refused: "TAC"}).encode(),
                       qos=1, properties=props)

    picky = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    picky.on_message = on_message
    picky.connect(mosquitto.host, mosquitto.port)
    picky.subscribe(contract.tx_topic(gate_id), qos=1)
    picky.loop_start()
    try:
        uplink = Uplink(config=mqtt_config(mosquitto, ack_timeout_s=0.3), gate_id=gate_id,
                        journal=journal)
        with running(uplink):
            wait_until(lambda: journal.pending_sync_count() == 0, "the refused entry to sync")
    finally:
        picky.disconnect()
        picky.loop_stop()
    assert seen[0] == journal_uuids(journal)
    assert seen[1] == [refused]


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


def test_prune_after_a_drain_keeps_the_chain_verifiable_and_sync_going_on(
        mosquitto: Mosquitto, headend: HeadEnd, gate: tuple[str, Journal]) -> None:
    gate_id, journal = gate
    terminal = bytes.fromhex(gate_id)
    journal.append_many(refusals(terminal, 50))
    uplink = Uplink(config=mqtt_config(mosquitto), gate_id=gate_id, journal=journal)
    with running(uplink):
        wait_until(lambda: journal.pending_sync_count() == 0, "the drain")
        journal.append(refusals(terminal, 1, "unsent")[0])  # not acked: stops the prune
        pruned = prune_once(journal, retention_days=30, now=time.time() + 60 * 86400)
        assert pruned == 50
        assert journal.verify().ok and journal.count() == 1
        for draft in refusals(terminal, 25, "after"):
            journal.append(draft)
        uplink.notify()
        wait_until(lambda: journal.pending_sync_count() == 0, "the drain after the prune")
        assert prune_once(journal, retention_days=30, now=time.time() + 60 * 86400) == 25
    assert journal.verify().ok and journal.count() == 1
    assert len(headend.uuids_of(gate_id)) == 76
    assert headend.chain_problems(gate_id) == []  # the head-end's chain spans the prunes


# --- TLS and the broker's ACL --------------------------------------------------------------
def make_pki(directory: Path, *clients: str) -> dict[str, tuple[Path, Path]]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate per name
    (CN = the name, which the broker takes as the user name): name -> (cert, key)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tapgate uplink test CA")])

    def issue(cn: str, key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
              ip: str | None = None) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(ca_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ip is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def write(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
              ) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path

    out = {"ca": write("ca", issue("tapgate uplink test CA", ca_key, ca=True), ca_key)}
    server_key = ec.generate_private_key(ec.SECP256R1())
    out["server"] = write("server", issue("127.0.0.1", server_key, ip="127.0.0.1"), server_key)
    for name in clients:
        key = ec.generate_private_key(ec.SECP256R1())
        out[name] = write(name, issue(name, key), key)
    return out


def test_over_tls_a_gate_syncs_its_own_topics_and_no_other_gates(
        tmp_path: Path, make_broker: Callable[..., Mosquitto],
        caplog: pytest.LogCaptureFixture) -> None:
    """Client certificates name the gates; the broker's ACL gives each gate only its own
    topics: a gate's uplink drains over TLS, and a gate posing as another gets nothing
    through (its entries stay pending on its disk)."""
    own, other = new_gate_id(), new_gate_id()
    pki = make_pki(tmp_path, own, "headend")
    acl = tmp_path / "acl"
    acl.write_text("pattern write tapgate/v1/%u/tx\npattern write tapgate/v1/%u/status\n"
                   "pattern read tapgate/v1/%u/ack\n\n"
                   "user headend\ntopic readwrite tapgate/v1/#\n", encoding="utf-8")
    ca = pki["ca"][0]
    broker = make_broker(  # user root: the files are in pytest's private temp dir
        "user root\nlistener {port} 127.0.0.1\n"
        f"cafile {ca}\ncertfile {pki['server'][0]}\nkeyfile {pki['server'][1]}\n"
        "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n"
        f"acl_file {acl}\n")
    standin = HeadEnd(broker, tls=(ca, *pki["headend"]))
    tls = {"tls_ca": ca, "tls_cert": pki[own][0], "tls_key": pki[own][1]}
    try:
        with Journal(tmp_path / "own.db") as mine, Journal(tmp_path / "other.db") as posing:
            mine.append_many(refusals(bytes.fromhex(own), 45))
            posing.append_many(refusals(bytes.fromhex(other), 45))
            honest = Uplink(config=mqtt_config(broker, **tls), gate_id=own, journal=mine)
            # the same certificate, but the topics (and client id) of another gate
            impostor = Uplink(config=mqtt_config(broker, **tls), gate_id=other,
                              journal=posing)
            with running(honest), running(impostor):
                wait_until(lambda: mine.pending_sync_count() == 0, "the drain over TLS")
                time.sleep(1.0)  # time enough for the impostor's batches, were they let in
                assert posing.pending_sync_count() == 45
            assert standin.uuids_of(own) == journal_uuids(mine)
            assert standin.uuids_of(other) == []
            assert impostor.stats.entries_acked == 0
    finally:
        standin.close()
    assert any("broker refuses" in r.getMessage() and other in r.getMessage()
               for r in caplog.records)


def test_a_bad_tls_file_is_a_sync_error_naming_the_settings(tmp_path: Path,
                                                            mosquitto: Mosquitto) -> None:
    with Journal(tmp_path / "journal.db") as journal:
        uplink = Uplink(config=mqtt_config(mosquitto, tls_ca=tmp_path / "missing-ca.pem"),
                        gate_id=new_gate_id(), journal=journal)
        with pytest.raises(SyncError, match=r"mqtt\.tls_ca"):
            uplink.run(threading.Event())


# --- the real daemon -----------------------------------------------------------------------
class Daemon:
    """`python -m daemon.cli run` as a subprocess, its log lines collected."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        if not env or "NOTIFY_SOCKET" not in env:
            full_env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=full_env, text=True)
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def count(self, text: str) -> int:
        with self._lock:
            return sum(text in line for line in self.lines)

    def wait_log(self, text: str, n: int = 1) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while self.count(text) < n:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                with self._lock:
                    tail = "\n".join(self.lines[-30:])
                pytest.fail(f"daemon: no {n} x {text!r}; rc={self.proc.poll()}\n{tail}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(TIMEOUT_S)
        self._reader.join(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(TIMEOUT_S)
        self._reader.join(10)
        return rc


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


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
        tmp_path: Path, mosquitto: Mosquitto, headend: HeadEnd, daemons: list[Daemon]) -> None:
    gate_id = new_gate_id()
    journal_path = tmp_path / "journal.db"
    with Journal(journal_path) as journal:  # a gate that was offline a long time
        journal.append_many(refusals(bytes.fromhex(gate_id), 3000, "backlog"))
    watch = StatusWatch(mosquitto, gate_id)
    headend.ack_delay_s = 0.005  # a head-end that takes its time: the drain is caught mid-way
    try:
        daemon = Daemon(daemon_config(tmp_path, gate_id, mosquitto, tap_interval_s=0.05))
        daemons.append(daemon)
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
        daemons.append(daemon)
        daemon.wait_log("tapgate running")
        watch.wait_state(contract.ONLINE, "online again")
        daemon.wait_log(" tapgate.tap: tap ", 5)  # taps go on while the backlog drains
        wait_until(lambda: pending_on_disk(journal_path)[1] < 10, "the backlog to drain")
        assert daemon.stop() == 0
        assert watch.wait_state(contract.OFFLINE, "offline on stop").telemetry == {
            "reason": "stopped"}

        # what the taps wrote in the last moments goes with the next start (no demo taps)
        daemon = Daemon(daemon_config(tmp_path, gate_id, mosquitto, tap_interval_s=0))
        daemons.append(daemon)
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
        tmp_path: Path, make_broker: Callable[..., Mosquitto], daemons: list[Daemon]) -> None:
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
        daemons.append(daemon)
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
        daemons.append(daemon)
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
        tmp_path: Path, mosquitto: Mosquitto, headend: HeadEnd, daemons: list[Daemon]) -> None:
    gate_id = new_gate_id()
    daemon = Daemon(daemon_config(tmp_path, gate_id, mosquitto, tap_interval_s=0.05,
                                  disk_alarm_pct=1))  # any disk is fuller than 1 %
    daemons.append(daemon)
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
