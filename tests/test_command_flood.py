"""Valid commands get through a flood of invalid ones (issue 11, item 3).

The gate is the sim rig with the real Uplink and Commands in threads on the suite's
mosquitto; a flooder publishes thousands of invalid messages on the gate's command
topics, each asking for an answer (garbage, JSON too deep, wrong shapes, unknown key
ids, forged signatures under the operator's own key id, commands for another gate,
captured valid commands replayed), while the operator sends ten valid commands among
them. Each of the ten is applied and answered. Before, the messages queued unread in a
64-slot queue and the flood crowded the valid ones out.

The broker here keeps what it has for the gate however many there are: mosquitto's own
limit (max_queued_messages, 1,000 by default) would otherwise drop messages to the gate,
valid ones among them, before the gate sees them (see docs/README.md on the broker's
settings for gates: ACLs on the command topics first).
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol import contract
from tests.command_support import TIMEOUT_S, Console, Operator, TestGate
from tests.fixtures.mosquitto import Mosquitto
from tests.waiting import wait_until

FLOOD = 4000
VALID = 10


class Flooder:
    """A paho client that publishes without waiting (QoS 1: the broker must keep them)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes, reply_under: str) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        nonce = secrets.token_bytes(8)
        props.ResponseTopic = f"{contract.reply_topic(reply_under)}/{nonce.hex()}"
        props.CorrelationData = nonce
        self.infos.append(self.client.publish(topic, payload, qos=1, properties=props))

    def close(self) -> None:
        for info in self.infos:
            info.wait_for_publish(TIMEOUT_S)
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(make_broker: Callable[..., Mosquitto]) -> Mosquitto:
    return make_broker("max_queued_messages 0\nlistener {port} 127.0.0.1\n"
                       "allow_anonymous true\n")


def invalid(op: Operator, stranger: Operator, gid: str) -> Iterator[tuple[str, bytes]]:
    """Topic and payload of one invalid message after another, of every kind."""
    captured = op.payload(gid, "report_status", {}, seq=1)  # applied before the flood
    forged = json.loads(op.payload(gid, "open_gate", {}, seq=10**6))
    forged["body"]["args"] = {"x": 1}
    own, fleet = contract.cmd_topic(gid), contract.fleet_cmd_topic()
    kinds: list[Callable[[int], tuple[str, bytes]]] = [
        lambda n: (own, secrets.token_bytes(n % 300 + 1)),
        lambda n: (own, b"[" * 2000 + b"]" * 2000),
        lambda n: (fleet, json.dumps({"key_id": op.key_id, "body": n, "sig": ""}).encode()),
        lambda n: (own, stranger.payload(gid, "open_gate", {}, seq=n)),
        lambda n: (own, json.dumps(forged).encode()),
        lambda n: (own, stranger.payload(gid, "open_gate", {}, seq=n, key_id=op.key_id)),
        lambda n: (own, op.payload("000000FFFFFF", "open_gate", {}, seq=10**6 + n)),
        lambda n: (own, captured),
        lambda n: (own, b"x" * (contract.MAX_COMMAND_BYTES + 1)),
    ]
    for n in itertools.count():
        yield kinds[n % len(kinds)](n)


def test_valid_commands_are_applied_and_answered_through_a_flood_of_invalid_ones(
        tmp_path: Path, broker: Mosquitto) -> None:
    op, stranger = Operator(), Operator()
    gate = TestGate(tmp_path, broker, [op])
    console, flooder = Console(broker), Flooder(broker)
    try:
        flood_the_gate(gate, console, flooder, op, stranger)
    finally:
        flooder.close()
        console.close()
        gate.close()


def flood_the_gate(gate: TestGate, console: Console, flooder: Flooder, op: Operator,
                   stranger: Operator) -> None:
    gid = gate.gate_id
    assert console.ask(gid, op.payload(gid, "report_status", {}, seq=1))["ok"]
    passages = gate.rig.gate.passages
    flood = invalid(op, stranger, gid)
    nonces: list[bytes] = []
    for i in range(FLOOD):
        topic, payload = next(flood)
        flooder.publish(topic, payload, gid)
        if i % (FLOOD // VALID) == FLOOD // VALID // 2:
            nonces.append(console.send(contract.cmd_topic(gid), op.payload(
                gid, "open_gate", {}, seq=2 + len(nonces)), reply_under=gid))
    wait_until(lambda: all(console.replies.get(x) for x in nonces), "the valid answers",
               TIMEOUT_S)
    assert len(nonces) == VALID
    for n, nonce in enumerate(nonces):
        assert console.replies[nonce][0] == {"gate": gid, "seq": 2 + n, "ok": True,
                                             "reason": "", "result": {"opened": True}}
    assert gate.rig.gate.passages == passages + VALID  # the forged open_gates opened nothing
    stats = gate.commands.stats
    assert (stats.applied, stats.dropped) == (1 + VALID, 0)
    assert gate.uplink.connected
