"""Operators' signed commands and the desired state, on the gate, against a real mosquitto.

The gate here is the sim rig (tests.rig.Rig: sim reader, software SAM, sim gate I/O,
a real journal) with the real Uplink and the real command handling (daemon.sync.commands)
in their own threads; the operator side is headend.command (its signing and its send),
or hand-built messages where a test forges, replays or breaks one. One test runs the
daemon itself. Taps go on between the commands and after every refusal.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.config import CARD_TYPES, OperatorsConfig, validate
from daemon.journal import Journal
from daemon.outcome import Outcome
from daemon.sync.commands import Commands
from daemon.sync.handlers import GateControl, effective_config
from daemon.sync.link import BrokerLink
from daemon.sync.uplink import Uplink
from headend import command, keys
from headend.mqtt import Broker
from protocol import contract
from protocol.command import Incoming
from protocol.errors import ConfigError
from tests.cards import serial_of
from tests.configs import gate_config, raw_config, toml_text
from tests.daemon_process import Daemon
from tests.fixtures.mosquitto import Mosquitto
from tests.rig import Rig
from tests.uplink_support import mqtt_config
from tests.waiting import wait_until

TIMEOUT_S = 30.0
_numbers = itertools.count(1)


def new_gate_id() -> str:
    return f"0000D{os.getpid() % 0xFFFF:04X}{next(_numbers):03X}"


class Operator:
    """An operator's key: signs with headend.command.sign; its seq counter is its own."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.key_id = keys.key_id(self.key)
        self.public_hex = keys.public_raw(self.key).hex().upper()
        self.seq = itertools.count(1)

    def payload(self, target: str, name: str, args: dict[str, Any], *, seq: int | None = None,
                issued_at: int | None = None, ttl_ms: int = 60_000,
                key_id: str | None = None) -> bytes:
        now = int(time.time() * 1000)
        issued = now if issued_at is None else issued_at
        body = contract.CommandBody(target=target, seq=next(self.seq) if seq is None else seq,
                                    issued_at=issued, expires_at=issued + ttl_ms, name=name,
                                    args=args)
        return command.sign(self.key, key_id or self.key_id, body).encode()


class Console:
    """A paho client that publishes raw command messages and collects the answers."""

    def __init__(self, broker: Mosquitto) -> None:
        self.replies: dict[bytes, list[dict[str, Any]]] = {}
        self.topics: dict[bytes, list[str]] = {}  # where each answer came
        self.reported: list[tuple[dict[str, Any], bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe([(contract.topic("+", "reply/+"), 1),
                               (contract.reported_topic("+"), 1)])
        assert subscribed.wait(TIMEOUT_S)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            if msg.topic.endswith("/reported"):
                self.reported.append((json.loads(msg.payload), bool(msg.retain)))
                return
            correlation = bytes(getattr(msg.properties, "CorrelationData", b"") or b"")
            self.replies.setdefault(correlation, []).append(json.loads(msg.payload))
            self.topics.setdefault(correlation, []).append(msg.topic)

    def send(self, topic: str, payload: bytes, *, reply_under: str | None = None,
             retain: bool = False) -> bytes:
        nonce = secrets.token_bytes(16)  # as headend/command.py makes it (the nonce)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if reply_under:
            props.ResponseTopic = f"{contract.reply_topic(reply_under)}/{nonce.hex()}"
        props.CorrelationData = nonce
        self.client.publish(topic, payload, qos=1, retain=retain,
                            properties=props).wait_for_publish(TIMEOUT_S)
        return nonce

    def ask(self, gate: str, payload: bytes, *, topic: str | None = None,
            reply_under: str | None = None) -> dict[str, Any]:
        nonce = self.send(topic or contract.cmd_topic(gate), payload,
                          reply_under=reply_under or gate)
        wait_until(lambda: bool(self.replies.get(nonce)), "the gate's answer", TIMEOUT_S)
        with self._lock:
            return self.replies[nonce][0]

    def last_reported(self) -> dict[str, Any] | None:
        with self._lock:
            return self.reported[-1][0] if self.reported else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class TestGate:
    """The sim rig, the real uplink and the real command handling, in threads."""

    __test__ = False

    def __init__(self, directory: Path, broker: Mosquitto, operators: list[Operator],
                 gate_id: str | None = None) -> None:
        self.gate_id = gate_id or new_gate_id()
        self.broker = broker
        self.rig = Rig(directory, config=gate_config(terminal_id=bytes.fromhex(self.gate_id),
                                                     anti_passback_s=0))
        self.base = self.rig.config
        self.operators = operators
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.start()

    def start(self) -> None:
        self.rig.config = effective_config(self.base, self.rig.journal)
        self.rig.processor.set_config(self.rig.config)
        journal = self.rig.journal
        link = BrokerLink(config=mqtt_config(self.broker), gate_id=self.gate_id)

        def sync_now() -> dict[str, Any]:
            link.wakeup.sync_now()
            return {"pending_sync": journal.pending_sync_count()}

        self.control = GateControl(processor=self.rig.processor, config=self.rig.config,
                                   telemetry=lambda: {"taps": self.rig.journal.count()},
                                   sync_now=sync_now, open_gate=self.rig.gate.open_for_passage)
        operators = OperatorsConfig(keys={o.key_id: bytes.fromhex(o.public_hex)
                                          for o in self.operators})
        self.commands = Commands(gate_id=self.gate_id, operators=operators, journal=journal,
                                 control=self.control, publish=link.publish)
        self.uplink = Uplink(config=mqtt_config(self.broker), gate_id=self.gate_id,
                             journal=journal, link=link, on_command=self.commands.submit)
        uplink = self.uplink
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=uplink.run, args=(self._stop,)),
                         threading.Thread(target=self.commands.run, args=(self._stop,))]
        for thread in self._threads:
            thread.start()
        wait_until(lambda: uplink.connected, "the uplink to connect", TIMEOUT_S)
        time.sleep(0.2)  # the subscriptions go with the connection; let them land

    def stop(self) -> None:
        self._stop.set()
        self.uplink.notify()
        for thread in self._threads:
            thread.join(TIMEOUT_S)
            assert not thread.is_alive()

    def restart(self, operators: list[Operator] | None = None) -> None:
        """A restart: threads stopped, the journal reopened, a new tap processor."""
        self.stop()
        if operators is not None:
            self.operators = operators
        self.rig.restart()
        self.start()

    def tap(self, n: int, **kw: Any) -> Any:
        return self.rig.tap(self.rig.card(n, **kw))

    def close(self) -> None:
        self.stop()
        self.rig.close()


@pytest.fixture
def console(mosquitto: Mosquitto) -> Iterator[Console]:
    c = Console(mosquitto)
    yield c
    c.close()


@pytest.fixture
def make_gate(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Callable[..., TestGate]]:
    made: list[TestGate] = []

    def make(operators: list[Operator], gate_id: str | None = None) -> TestGate:
        gate = TestGate(tmp_path / f"gate{len(made)}", mosquitto, operators, gate_id)
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.close()


def send(broker: Mosquitto, op: Operator, target: str, name: str, args: dict[str, Any],
         seq: int | None = None) -> tuple[int, list[dict[str, Any]]]:
    """headend.command.send: sign, send, print the answer(s) as JSON lines."""
    out = io.StringIO()
    request = command.Request(target=target, name=name, args=args,
                              seq=next(op.seq) if seq is None else seq, ttl_s=60, timeout_s=10)
    rc = command.send(Broker(broker.host, broker.port), op.key, op.key_id, request, out)
    return rc, [json.loads(line) for line in out.getvalue().splitlines()]


# --- config --------------------------------------------------------------------------------
def test_operator_keys_config() -> None:
    op = Operator()
    raw = raw_config()
    raw["operators"] = {"keys": {op.key_id.lower(): op.public_hex}, "clock_skew_s": 5}
    operators = validate(raw).operators
    assert operators.keys == {op.key_id: bytes.fromhex(op.public_hex)}
    assert operators.clock_skew_s == 5
    assert validate(raw_config()).operators.keys == {}
    other = Operator()
    for table, why in (({"XYZ": op.public_hex}, "16 hex digits"),
                       ({op.key_id: "00"}, "64 hex digits"),
                       ({other.key_id: op.public_hex}, "the first 8 bytes of the public key"),
                       ({op.key_id: op.public_hex, other.key_id: op.public_hex},
                        "the first 8 bytes of the public key"),
                       ("nope", "must be a table")):
        raw["operators"] = {"keys": table}
        with pytest.raises(ConfigError, match=why):
            validate(raw)


# --- each command --------------------------------------------------------------------------
def test_each_command_works_and_answers(mosquitto: Mosquitto,
                                        make_gate: Callable[..., TestGate]) -> None:
    op = Operator()
    gate = make_gate([op])
    gid = gate.gate_id
    assert gate.tap(1).amount == 250

    rc, (reply,) = send(mosquitto, op, gid, "set_config",
                        {"gate.fares.adult": 300, "gate.anti_passback_s": 0})
    assert rc == command.EXIT_OK and reply["ok"] and reply["gate"] == gid
    assert reply["result"] == {"set": {"gate.fares.adult": 300, "gate.anti_passback_s": 0}}
    assert gate.tap(1).amount == 300  # from the next tap on

    rc, (reply,) = send(mosquitto, op, gid, "denylist", {
        "from_version": 0, "to_version": 1, "add": [serial_of(2).hex().upper()]})
    assert rc == command.EXIT_OK and reply["result"] == {"version": 1, "size": 1}
    refused = gate.tap(2)
    assert (refused.outcome, refused.reason) == (Outcome.REFUSED, "card on deny list")
    assert gate.tap(1).outcome is Outcome.ACCEPTED  # another card goes through
    rc, (reply,) = send(mosquitto, op, gid, "denylist", {
        "from_version": 1, "to_version": 2, "remove": [serial_of(2).hex()]})
    assert rc == command.EXIT_OK and reply["result"] == {"version": 2, "size": 0}
    assert gate.tap(2).outcome is Outcome.ACCEPTED

    rc, (reply,) = send(mosquitto, op, gid, "sync_now", {})
    assert rc == command.EXIT_OK and "pending_sync" in reply["result"]

    rc, (reply,) = send(mosquitto, op, gid, "report_status", {})
    assert rc == command.EXIT_OK and reply["result"]["taps"] > 0
    remote = reply["result"]["remote"]
    assert remote["deny_list"] == {"version": 2, "size": 0}
    assert remote["config"]["fares"][str(CARD_TYPES["adult"])] == 300

    passages = gate.rig.gate.passages
    rc, (reply,) = send(mosquitto, op, gid, "open_gate", {})
    assert rc == command.EXIT_OK and reply["result"] == {"opened": True}
    assert gate.rig.gate.passages == passages + 1

    rc, (reply,) = send(mosquitto, op, gid, "trigger_beacon", {})
    assert rc == command.EXIT_REFUSED
    assert (reply["ok"], reply["reason"]) == (False, "no beacon configured")

    rc, answers = send(mosquitto, op, contract.FLEET, "sync_now", {})
    assert rc == command.EXIT_OK and [a["gate"] for a in answers] == [gid]
    assert gate.commands.stats.applied == 7


# --- refusals ------------------------------------------------------------------------------
def test_forged_broken_and_stale_commands_are_refused_with_the_reason(
        mosquitto: Mosquitto, console: Console, make_gate: Callable[..., TestGate]) -> None:
    op, stranger = Operator(), Operator()
    gate = make_gate([op])
    gid = gate.gate_id
    now = int(time.time() * 1000)
    good = op.payload(gid, "sync_now", {}, seq=100)
    forged = json.loads(good)
    forged["body"]["args"] = {"x": 1}  # altered in transit: the signature no longer fits
    cases: list[tuple[str, bytes, str]] = [
        ("forged signature", json.dumps(forged).encode(), "bad signature"),
        ("signed by another key under our id",
         stranger.payload(gid, "sync_now", {}, key_id=op.key_id), "bad signature"),
        ("unknown key", stranger.payload(gid, "sync_now", {}), "unknown key id"),
        ("expired", op.payload(gid, "sync_now", {}, issued_at=now - 120_000), "expired"),
        ("future", op.payload(gid, "sync_now", {}, issued_at=now + 600_000),
         "issued in the future"),
        ("malformed", b"{not json", "malformed: not JSON"),
        ("wrong shape", b'{"key_id": "x", "body": 1, "sig": ""}', "malformed: "),
        ("oversized", b"x" * (contract.MAX_COMMAND_BYTES + 1), "too large"),
        ("seq past 64 bits", op.payload(gid, "sync_now", {}, seq=2**63),
         "malformed: body.seq must be an integer, 0 to 2**63 - 1"),
        ("another gate", op.payload("000000FFFFFF", "sync_now", {}), "not for this gate"),
        ("fleet on the gate's topic", op.payload(contract.FLEET, "sync_now", {}),
         "not for this gate"),
        ("unknown name", op.payload(gid, "self_destruct", {}), "unknown command"),
        ("bad fare", op.payload(gid, "set_config", {"gate.fares.adult": -1}), "bad args: "),
        ("not settable", op.payload(gid, "set_config", {"sam.purchase_key": "00"}),
         "bad args: "),
        ("bad window", op.payload(gid, "set_config", {"gate.anti_passback_s": "5"}),
         "bad args: "),
        ("bad deny-list", op.payload(gid, "denylist", {"from_version": 0, "to_version": 1,
                                                      "add": ["12"]}), "bad args: "),
    ]
    for n, (what, payload, reason) in enumerate(cases):
        reply = console.ask(gid, payload)
        assert reply["ok"] is False and reply["reason"].startswith(reason), (what, reply)
        assert reply["gate"] == gid
        assert gate.tap(10 + n).outcome is Outcome.ACCEPTED, what  # taps go on
    # a command refused for its arguments used its seq up: sent again (a tool's retry),
    # it is told the answer it got, and nothing is applied again
    refused_once = console.ask(gid, cases[-1][1])
    assert refused_once["reason"].startswith("bad args: ")
    first = console.ask(gid, good)
    assert first["ok"] and first["seq"] == 100
    assert console.ask(gid, good) == first  # a retry: the same answer, not "replayed"
    # another command under a used seq is a replay
    other = console.ask(gid, op.payload(gid, "report_status", {}, seq=100))
    assert (other["reason"], other["result"]) == ("replayed", {"last_seq": 100})
    lower = console.ask(gid, op.payload(gid, "sync_now", {}, seq=99))
    assert (lower["reason"], lower["result"]) == ("replayed", {"last_seq": 100})
    assert console.ask(gid, op.payload(gid, "sync_now", {}, seq=1000))["ok"]
    # a name this gate does not know uses no seq up
    assert console.ask(gid, op.payload(gid, "self_destruct", {}, seq=1001))["reason"] == (
        "unknown command")
    assert console.ask(gid, op.payload(gid, "sync_now", {}, seq=1001))["ok"]
    # a fleet command on the fleet topic, answered under the gate's own reply topic (which
    # only it may write), with the last level of the fleet's
    nonce = console.send(contract.fleet_cmd_topic(),
                         op.payload(contract.FLEET, "report_status", {}, seq=1002),
                         reply_under=contract.FLEET)
    wait_until(lambda: bool(console.replies.get(nonce)), "the fleet answer", TIMEOUT_S)
    assert console.replies[nonce][0]["ok"] and console.replies[nonce][0]["gate"] == gid
    assert console.topics[nonce] == [f"{contract.reply_topic(gid)}/{nonce.hex()}"]
    # an answer is never sent outside the reply topics: the refusal is only logged
    nonce = console.send(contract.cmd_topic(gid), op.payload(gid, "sync_now", {}, seq=5),
                         reply_under=None)
    time.sleep(0.3)
    assert nonce not in console.replies
    assert gate.commands.stats.refused >= len(cases) + 3
    assert gate.commands.verifier.answer_topic(contract.status_topic(gid)) is None
    assert gate.commands.verifier.answer_topic(contract.reply_topic("000000FFFFFF") + "/x") is None
    assert gate.commands.verifier.answer_topic(contract.reply_topic(contract.FLEET) + "/x") == (
        contract.reply_topic(gid) + "/x")


def test_deny_list_versions_and_state_survive_a_restart(
        mosquitto: Mosquitto, console: Console, make_gate: Callable[..., TestGate]) -> None:
    op = Operator()
    gate = make_gate([op])
    gid = gate.gate_id
    card3, card4 = serial_of(3).hex().upper(), serial_of(4).hex().upper()
    assert console.ask(gid, op.payload(gid, "denylist", {
        "from_version": 0, "to_version": 5, "add": [card3, card4]}))["ok"]
    stale = console.ask(gid, op.payload(gid, "denylist", {
        "from_version": 0, "to_version": 1, "remove": [card3]}))
    assert (stale["ok"], stale["reason"], stale["result"]) == (
        False, "deny list version mismatch", {"version": 5})
    assert gate.tap(3).reason == "card on deny list"  # the stale delta changed nothing
    assert console.ask(gid, op.payload(gid, "set_config", {"gate.fares.adult": 410}))["ok"]
    assert gate.tap(1).amount == 410

    gate.restart()
    assert gate.tap(3).reason == "card on deny list"
    assert gate.tap(4).reason == "card on deny list"
    assert gate.tap(1).amount == 410  # the remote fare came back from the journal
    assert gate.rig.processor.deny_list.version == 5
    replay = console.ask(gid, op.payload(gid, "sync_now", {}, seq=2))
    assert (replay["reason"], replay["result"]) == ("replayed", {"last_seq": 3})
    assert console.ask(gid, op.payload(gid, "denylist", {
        "from_version": 5, "to_version": 6, "remove": [card3]}))["ok"]
    assert gate.tap(3).outcome is Outcome.ACCEPTED

    # the journal alone holds it all: opened cold, by another process's code path
    with Journal(gate.rig.journal_path) as journal:
        assert journal.deny_list() == (6, frozenset({serial_of(4)}))
        assert journal.remote_config() == {"gate.fares.adult": 410}
        assert journal.last_command_seq(op.key_id) == 4


def test_key_rotation(mosquitto: Mosquitto, console: Console,
                      make_gate: Callable[..., TestGate]) -> None:
    old, new = Operator(), Operator()
    gate = make_gate([old, new])
    gid = gate.gate_id
    assert console.ask(gid, old.payload(gid, "sync_now", {}))["ok"]
    assert console.ask(gid, new.payload(gid, "sync_now", {}))["ok"]  # seqs are per key
    gate.restart([new])  # the old key removed from the config
    assert console.ask(gid, old.payload(gid, "sync_now", {}))["reason"] == "unknown key id"
    assert console.ask(gid, new.payload(gid, "sync_now", {}))["ok"]
    assert gate.tap(1).outcome is Outcome.ACCEPTED


def test_desired_state_applied_and_reported_retained(
        mosquitto: Mosquitto, console: Console, make_gate: Callable[..., TestGate]) -> None:
    op = Operator()
    gate = make_gate([op])
    gid = gate.gate_id
    desired = contract.desired_topic(gid)

    def wait_reported(expected: dict[str, Any]) -> None:
        wait_until(lambda: console.last_reported() == expected, f"reported {expected}",
                   TIMEOUT_S)

    try:
        console.send(desired, op.payload(gid, "desired", {
            "version": 3, "config": {"gate.fares.adult": 333}}, ttl_ms=3_600_000),
            retain=True)
        wait_reported({"version": 3})
        assert gate.tap(1).amount == 333
        # an older version is refused and said so; what runs stays
        console.send(desired, op.payload(gid, "desired", {
            "version": 2, "config": {"gate.fares.adult": 222}}), retain=True)
        wait_reported({"version": 3, "refused": {
            "version": 2, "reason": "version 2 is older than the version running (3)"}})
        console.send(desired, op.payload(gid, "desired", {
            "version": 4, "config": {"gate.fares.adult": "free"}}), retain=True)
        refused = wait_for_refusal(console, 4)
        assert refused.startswith("bad args: gate.fares.adult")
        forged = json.loads(op.payload(gid, "desired", {"version": 9, "config": {}}))
        forged["body"]["args"]["version"] = 10
        console.send(desired, json.dumps(forged).encode(), retain=True)
        assert wait_for_refusal(console, None) == "bad signature"
        assert gate.tap(1).amount == 333

        console.send(desired, op.payload(gid, "desired", {
            "version": 5, "config": {"gate.fares.adult": 555, "gate.anti_passback_s": 0}},
            ttl_ms=3_600_000), retain=True)
        wait_reported({"version": 5})
        assert gate.tap(1).amount == 555

        # a restart: the retained desired state comes again, the version is reported again
        console.reported.clear()
        gate.restart()
        wait_reported({"version": 5})
        assert gate.tap(1).amount == 555
        assert gate.commands.control.desired_version == 5
        # what a newcomer sees: the retained report
        late = Console(mosquitto)
        try:
            wait_until(lambda: any(r == ({"version": 5}, True) for r in late.reported),
                       "the retained report", TIMEOUT_S)
        finally:
            late.close()
    finally:
        console.send(desired, b"", retain=True)  # clear the retained message


def wait_for_refusal(console: Console, version: int | None) -> str:
    def refused() -> bool:
        last = console.last_reported()
        return bool(last and last.get("refused", {}).get("version", -1) == version)

    wait_until(refused, f"the refusal of desired version {version}", TIMEOUT_S)
    last = console.last_reported()
    assert last is not None
    return str(last["refused"]["reason"])


def test_commands_are_handled_without_a_broker_in_between(tmp_path: Path) -> None:
    """The handling itself, as paho hands it over: the queue, the thread, the answer."""
    op = Operator()
    gid = new_gate_id()
    rig = Rig(tmp_path, config=gate_config(terminal_id=bytes.fromhex(gid)))
    published: list[tuple[str, bytes, dict[str, Any]]] = []

    def publish(topic: str, payload: bytes, **kw: Any) -> bool:
        published.append((topic, payload, kw))
        return True

    control = GateControl(processor=rig.processor, config=rig.config, telemetry=dict)
    commands = Commands(gate_id=gid, operators=OperatorsConfig(
        keys={op.key_id: bytes.fromhex(op.public_hex)}), journal=rig.journal,
        control=control, publish=publish)
    stop = threading.Event()
    thread = threading.Thread(target=commands.run, args=(stop,))
    thread.start()
    try:
        reply_to = contract.reply_topic(gid) + "/abc"
        commands.submit(Incoming(contract.cmd_topic(gid), op.payload(gid, "sync_now", {}),
                                 reply_to, b"corr"))
        commands.submit(Incoming(contract.cmd_topic(gid), op.payload(gid, "open_gate", {}),
                                 reply_to, b"corr2"))
        wait_until(lambda: len(published) == 2, "two answers", TIMEOUT_S)
    finally:
        stop.set()
        thread.join(TIMEOUT_S)
        rig.close()
    answers = [(json.loads(p)["reason"], kw["correlation"]) for _, p, kw in published]
    assert answers == [("no uplink", b"corr"), ("no gate I/O", b"corr2")]


# --- the daemon ----------------------------------------------------------------------------
def test_the_daemon_obeys_signed_commands_and_keeps_taking_taps(
        tmp_path: Path, mosquitto: Mosquitto, console: Console) -> None:
    op = Operator()
    gid = new_gate_id()
    raw = raw_config(tmp_path / "journal.db")
    raw["gate"]["terminal_id"] = gid
    raw["gate"]["anti_passback_s"] = 0
    raw["reader"] = {"backend": "sim", "sim_interval_s": 0.05, "sim_cards": 3,
                     "sim_tear_rate": 0}
    raw["mqtt"] = {"host": mosquitto.host, "port": mosquitto.port, "reconnect_min_s": 0.05,
                   "reconnect_max_s": 0.5, "status_interval_s": 0.5}
    raw["operators"] = {"keys": {op.key_id: op.public_hex}}
    config = tmp_path / "tapgate.toml"
    config.write_text(toml_text(raw), encoding="utf-8")
    denied = "tap 8801000000000001: refused (card on deny list)"
    daemons: list[Daemon] = []
    try:
        daemon = Daemon(config)
        daemons.append(daemon)
        daemon.wait_log("tapgate running")
        daemon.wait_log("connected to the broker")
        time.sleep(0.3)
        assert console.ask(gid, b"\x00 junk")["reason"] == "malformed: not JSON"
        reply = console.ask(gid, op.payload(gid, "denylist", {
            "from_version": 0, "to_version": 1, "add": ["8801000000000001"]}))
        assert reply["ok"], reply
        daemon.wait_log(denied, 2)
        taps = daemon.count("tapgate.tap: tap ")
        daemon.wait_log("tapgate.tap: tap 8801000000000000: accepted", 1)
        status = console.ask(gid, op.payload(gid, "report_status", {}))
        assert status["result"]["remote"]["deny_list"] == {"version": 1, "size": 1}
        assert status["result"]["commands"]["refused"] == 1
        assert daemon.stop() == 0
        assert daemon.count("tapgate.tap: tap ") > taps

        daemon = Daemon(config)  # the deny list and the seq survive the restart
        daemons.append(daemon)
        daemon.wait_log("connected to the broker")
        daemon.wait_log(denied, 2)
        time.sleep(0.3)
        replay = console.ask(gid, op.payload(gid, "sync_now", {}, seq=1))
        assert (replay["reason"], replay["result"]) == ("replayed", {"last_seq": 2})
        assert daemon.stop() == 0
    finally:
        for d in daemons:
            d.kill()
