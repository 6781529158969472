"""What the command tests share: an operator's key (:class:`Operator`), a console that
sends raw command messages and collects the answers (:class:`Console`), the gate with its
real Uplink and Commands in threads over a real mosquitto (:class:`TestGate`), and the
command handling alone, in-process, with what it publishes collected
(:func:`gate_in_process`). tests/conftest.py registers this module as a plugin: its
fixtures (``console``, ``make_gate``) serve every test_command*.py module.
"""

from __future__ import annotations

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

from daemon.config import OperatorsConfig
from daemon.sync.commands import Commands
from daemon.sync.handlers import GateControl, effective_config
from daemon.sync.link import BrokerLink
from daemon.sync.uplink import Uplink
from headend import command, keys
from protocol import contract
from tests.configs import gate_config
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


Published = list[tuple[str, bytes, dict[str, Any]]]  # topic, payload, keywords


def gate_in_process(directory: Path, operators: list[Operator], *, gate_id: str | None = None,
                    opened: list[int] | None = None) -> tuple[Rig, Commands, Published]:
    """The sim rig and the real Commands with nothing between them and the caller: what
    they publish (answers, reports) is collected; ``opened`` counts open_gate's."""
    gid = gate_id or new_gate_id()
    rig = Rig(directory, config=gate_config(terminal_id=bytes.fromhex(gid)))
    published: Published = []

    def publish(topic: str, payload: bytes, **kw: Any) -> bool:
        published.append((topic, payload, kw))
        return True

    opener = None if opened is None else (lambda: opened.append(1))
    control = GateControl(processor=rig.processor, config=rig.config, telemetry=dict,
                          open_gate=opener)
    commands = Commands(gate_id=gid, operators=OperatorsConfig(
        keys={o.key_id: bytes.fromhex(o.public_hex) for o in operators}),
        journal=rig.journal, control=control, publish=publish)
    return rig, commands, published
