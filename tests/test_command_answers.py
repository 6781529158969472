"""Every command is answered while the gate is connected, and a retry with the same seq
is told the answer it got instead of being applied again (issue 11, items 1 and 2).

The gate is tests.test_commands' (the sim rig, the real Uplink and Commands in threads,
a real mosquitto); tests/proxy.py sits between the gate and the broker where a test
holds the gate's PUBACKs back or cuts its connection.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import tests.command_support as support
from daemon.config import OperatorsConfig
from daemon.journal.control import ANSWERS_KEPT
from daemon.sync.commands import Commands
from daemon.sync.link import ANSWER_SLOTS
from headend import command
from headend.mqtt import Broker
from protocol import contract
from protocol.command import MAX_DEPTH, Incoming
from tests.command_support import TIMEOUT_S, Console, Operator, TestGate
from tests.fixtures.mosquitto import Mosquitto
from tests.proxy import Proxy
from tests.waiting import wait_until


@pytest.fixture
def proxied_gate(tmp_path: Path, mosquitto: Mosquitto
                 ) -> Iterator[Callable[[list[Operator]], tuple[TestGate, Proxy]]]:
    made: list[tuple[TestGate, Proxy]] = []

    def make(operators: list[Operator]) -> tuple[TestGate, Proxy]:
        proxy = Proxy(mosquitto.host, mosquitto.port)
        gate = TestGate(tmp_path / f"gate{len(made)}", proxy, operators)  # type: ignore[arg-type]
        made.append((gate, proxy))
        return gate, proxy

    yield make
    for gate, proxy in made:
        proxy.release()
        gate.close()
        proxy.close()


def test_answers_wait_for_room_while_connected_and_none_is_dropped(
        console: Console, proxied_gate: Callable[[list[Operator]], tuple[TestGate, Proxy]]
) -> None:
    """The broker's PUBACKs held back: paho's queue fills; the answers wait, and every
    one goes out once the PUBACKs come (before, those past the queue were dropped as
    "not sent: no connection")."""
    op = Operator()
    gate, proxy = proxied_gate([op])
    gid = gate.gate_id
    n = ANSWER_SLOTS + 8  # under mosquitto's 20 in flight to one client
    proxy.hold()
    nonces = [console.send(contract.cmd_topic(gid), op.payload(gid, "report_status", {}),
                           reply_under=gid) for _ in range(n)]
    # more commands handled than the answers the queue holds (an old gate: all of them)
    wait_until(lambda: gate.commands.stats.applied > ANSWER_SLOTS, "the commands applied",
               TIMEOUT_S)
    time.sleep(0.5)  # the time an old gate takes to drop the answers past its queue
    assert gate.uplink.connected
    proxy.release()
    wait_until(lambda: all(console.replies.get(x) for x in nonces), "every answer", TIMEOUT_S)
    assert all(console.replies[x][0]["ok"] for x in nonces)
    assert gate.commands.stats.applied == n
    assert gate.commands.stats.dropped == 0


def test_a_retry_with_the_same_seq_gets_the_answer_and_applies_nothing_twice(
        mosquitto: Mosquitto,
        proxied_gate: Callable[[list[Operator]], tuple[TestGate, Proxy]]) -> None:
    """open_gate is applied, its answer lost with the connection; the operator's tool
    sends it again with the same seq and is told it opened: the gate opened once."""
    op = Operator()
    gate, proxy = proxied_gate([op])
    gid = gate.gate_id
    passages = gate.rig.gate.passages
    out = io.StringIO()
    request = command.Request(target=gid, name="open_gate", args={}, seq=7, ttl_s=120,
                              timeout_s=3, retries=10)
    result: list[int] = []
    proxy.hold()
    sender = threading.Thread(target=lambda: result.append(command.send(
        Broker(mosquitto.host, mosquitto.port), op.key, op.key_id, request, out)))
    sender.start()
    try:
        wait_until(lambda: gate.rig.gate.passages == passages + 1, "the gate to open",
                   TIMEOUT_S)
        proxy.cut()  # the answer is lost with the connection (paho's queue goes with it)
        proxy.release()
    finally:
        sender.join(TIMEOUT_S * 2)
    assert result == [command.EXIT_OK]
    replies = [json.loads(line) for line in out.getvalue().splitlines()]
    assert replies[0] == {"gate": gid, "seq": 7, "ok": True, "reason": "",
                          "result": {"opened": True}}
    assert gate.rig.gate.passages == passages + 1  # applied once
    assert gate.commands.stats.applied == 1


def test_kept_answers_survive_a_restart_and_only_the_same_command_gets_them(
        tmp_path: Path) -> None:
    op = Operator()
    rig, commands, _ = support.gate_in_process(tmp_path, [op], opened=[])
    gid = commands.gate_id
    reply_to = contract.reply_topic(gid) + "/r"

    def ask(payload: bytes, commands: Commands = commands) -> dict[str, Any]:
        reply = commands.handle(Incoming(contract.cmd_topic(gid), payload, reply_to, b"c"))
        assert reply is not None
        return json.loads(reply.encode())  # type: ignore[no-any-return]

    opening = op.payload(gid, "open_gate", {}, seq=5)
    first = ask(opening)
    assert first == {"gate": gid, "seq": 5, "ok": True, "reason": "",
                     "result": {"opened": True}}
    refused = op.payload(gid, "set_config", {"gate.fares.adult": -1}, seq=6)
    bad = ask(refused)
    assert bad["reason"].startswith("bad args: ")
    assert ask(opening) == first and ask(refused) == bad
    # the same seq, signed anew (other times): the same command, the same answer
    assert ask(op.payload(gid, "open_gate", {}, seq=5, ttl_ms=90_000)) == first
    other = ask(op.payload(gid, "report_status", {}, seq=5))  # another command, used seq
    assert (other["reason"], other["result"]) == ("replayed", {"last_seq": 6})
    never = ask(op.payload(gid, "open_gate", {}, seq=3))  # below, never applied
    assert (never["reason"], never["result"]) == ("replayed", {"last_seq": 6})
    assert commands.stats.applied == 1

    rig.restart()
    published: list[bytes] = []
    again = Commands(gate_id=gid, operators=OperatorsConfig(
        keys={op.key_id: bytes.fromhex(op.public_hex)}), journal=rig.journal,
        control=commands.control, publish=lambda t, p, **kw: published.append(p) or True)
    assert ask(opening, again) == first
    assert again.stats.applied == 0

    # only the newest ANSWERS_KEPT per key are kept: older ones are replays
    for seq in range(10, 10 + ANSWERS_KEPT + 1):
        assert ask(op.payload(gid, "report_status", {}, seq=seq), again)["ok"]
    assert ask(opening, again)["reason"] == "replayed"
    assert ask(op.payload(gid, "report_status", {}, seq=11), again)["ok"]
    assert ask(op.payload(gid, "report_status", {}, seq=10), again)["reason"] == "replayed"
    rig.close()


def _nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def test_deeply_nested_commands_are_refused_as_malformed(tmp_path: Path) -> None:
    op = Operator()
    rig, commands, published = support.gate_in_process(tmp_path, [op])
    gid = commands.gate_id
    reply_to = contract.reply_topic(gid) + "/r"
    deep_args: Any = {}
    for _ in range(MAX_DEPTH):
        deep_args = {"a": deep_args}
    cases = [_nested(1000), _nested(8000), b'{"key_id":' + _nested(1200) + b"}",
             op.payload(gid, "set_config", deep_args)]
    assert all(len(p) <= contract.MAX_COMMAND_BYTES for p in cases)
    for payload in cases:
        for topic in (contract.cmd_topic(gid), contract.desired_topic(gid)):
            commands.handle(Incoming(topic, payload, reply_to, b"c"))
    answers = [json.loads(p) for t, p, _ in published if "/reply/" in t]
    assert [a["reason"] for a in answers] == [
        f"malformed: nested deeper than {MAX_DEPTH} levels"] * len(cases)
    reported = [json.loads(p) for t, p, _ in published if t.endswith("/reported")]
    assert [r["refused"]["reason"] for r in reported] == [
        f"malformed: nested deeper than {MAX_DEPTH} levels"] * len(cases)
    rig.close()


def test_the_operator_tool_survives_a_deeply_nested_answer(mosquitto: Mosquitto) -> None:
    """A "gate" that answers first with JSON 5,000 levels deep, then properly: the tool
    ignores the first (before, paho's thread died on a RecursionError) and takes the
    second."""
    op = Operator()
    gid = support.new_gate_id()
    fake = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = msg.properties.CorrelationData  # type: ignore[union-attr]
        topic = str(msg.properties.ResponseTopic)  # type: ignore[union-attr]
        client.publish(topic, _nested(5000), qos=1, properties=props)
        seq = json.loads(msg.payload)["body"]["seq"]
        client.publish(topic, contract.Reply(gid, seq, True, "", {"x": 1}).encode(), qos=1,
                       properties=props)

    subscribed = threading.Event()
    fake.on_message = on_message
    fake.on_subscribe = lambda *a: subscribed.set()
    fake.connect(mosquitto.host, mosquitto.port)
    fake.loop_start()
    try:
        fake.subscribe(contract.cmd_topic(gid), qos=1)
        assert subscribed.wait(TIMEOUT_S)
        out = io.StringIO()
        rc = command.send(Broker(mosquitto.host, mosquitto.port), op.key, op.key_id,
                          command.Request(target=gid, name="sync_now", args={}, seq=1,
                                          ttl_s=60, timeout_s=TIMEOUT_S, retries=0), out)
    finally:
        fake.disconnect()
        fake.loop_stop()
    assert rc == command.EXIT_OK
    assert json.loads(out.getvalue()) == {"gate": gid, "seq": 1, "ok": True, "reason": "",
                                          "result": {"x": 1}}
