"""What a real gate and head-end publish matches docs/asyncapi.yaml: a real daemon (sim
reader, signed journal, with a journal of signed taps, tears and recoveries made
beforehand) publishes its status, batches and Last Will to a real mosquitto, the real
head-end consumer acks them, the operator tool's signed commands are answered;
everything is captured off the broker, MQTT v5 properties included, and each message
must be on a documented channel and match one of its messages.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from headend import command, keys
from headend.consumer import Consumer
from headend.mqtt import Broker
from headend.store import Store
from headend.verify import Verifier
from protocol import contract, devicekey
from tests.asyncapi_support import ROOT, Schemas, channel_of, message_names
from tests.cards import MASTER_TAC_KEY
from tests.configs import raw_config, toml_text
from tests.daemon_process import Daemon
from tests.fixtures.mosquitto import Mosquitto
from tests.gate_stub import SignedGate

TIMEOUT_S = 60.0
_gate_numbers = itertools.count(1)


# --- real messages off a real broker -------------------------------------------------------------
@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None
    correlation: bytes | None

    def json(self) -> Any:
        return json.loads(self.payload)


class Sniffer:
    """Every message on the given topic filters, with its retain flag and properties."""

    def __init__(self, broker: Mosquitto, *filters: str) -> None:
        self.seen: list[Seen] = []
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=f"asyncapi-sniffer-{os.getpid()}-{id(self)}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port, 30, clean_start=True)
        self.client.loop_start()
        # retain as published: the retain flag says what the publisher set, live or not
        self.client.subscribe([(f, SubscribeOptions(qos=1, retainAsPublished=True))
                               for f in filters])
        assert subscribed.wait(10), "the sniffer could not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        with self._cond:
            self.seen.append(Seen(msg.topic, bytes(msg.payload), bool(msg.retain), response,
                                  bytes(correlation) if correlation is not None else None))
            self._cond.notify_all()

    def on(self, topic: str) -> list[Seen]:
        with self._cond:
            return [s for s in self.seen if s.topic == topic]

    def wait(self, what: str, predicate: Callable[[], bool],
             failing: Callable[[], str] = lambda: "") -> None:
        deadline = time.monotonic() + TIMEOUT_S
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"timed out waiting for {what}\n{failing()}")
                self._cond.wait(min(left, 0.2))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def headend_consumer(tmp_path: Path, broker: Mosquitto, gate: str,
                     public: Any) -> Iterator[Consumer]:
    """The real head-end consumer, in a thread, on this gate's tx topic only (the broker
    is shared with other tests)."""
    store = Store(f"sqlite:///{tmp_path / 'headend.db'}").open()
    consumer = Consumer(store=store, broker=Broker(broker.host, broker.port),
                        verifier=Verifier(tac_master_key=MASTER_TAC_KEY,
                                          gate_keys={gate: [public]}),
                        client_id=f"asyncapi-headend-{gate}",
                        subscription=contract.tx_topic(gate))
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), name="headend")
    thread.start()
    try:
        yield consumer
    finally:
        stop.set()
        thread.join(TIMEOUT_S)
        store.close()


def daemon_config(tmp_path: Path, gate: str, broker: Mosquitto, journal: Path,
                  device_key: Path, operator: Ed25519PrivateKey) -> Path:
    raw = raw_config(journal)
    raw["operators"] = {"keys": {keys.key_id(operator): keys.public_raw(operator).hex()}}
    raw["gate"]["terminal_id"] = gate
    raw["gate"]["anti_passback_s"] = 0
    raw["journal"]["device_key"] = str(device_key)
    raw["reader"] = {"backend": "sim", "sim_interval_s": 0.05, "sim_cards": 4,
                     "sim_tear_rate": 0.2}
    raw["mqtt"] = {"host": broker.host, "port": broker.port, "batch_size": 7, "window": 2,
                   "reconnect_min_s": 0.05, "reconnect_max_s": 0.5, "ack_timeout_s": 5.0,
                   "status_interval_s": 0.3}
    raw["gate"].update(name="North entrance 3", station="Central",
                       page_url=f"https://transit.example/g/{gate}")
    raw["beacon"] = {"enabled": True, "backend": "sim", "uuid": str(uuid.uuid4()),
                     "major": 1, "minor": 7, "namespace": "8b0ca750e7a74e14bd99",
                     "url": "https://tg.example/a7", "eid_key": "00" * 16}
    path = tmp_path / "tapgate.toml"
    path.write_text(toml_text(raw), encoding="utf-8")
    return path


# (seq, target, name, args, ok): what the operator tool sends, and whether the gate obeys
OPERATIONS: list[tuple[int, str | None, str, dict[str, Any], bool]] = [
    (1, None, "sync_now", {}, True),
    (1, None, "report_status", {}, False),  # replayed
    (2, None, "denylist", {"from_version": 0, "to_version": 1, "add": ["8801000000000099"]},
     True),
    (3, None, "set_config", {"gate.anti_passback_s": 0, "gate.fares.adult": 250}, True),
    (4, None, "open_gate", {}, True),
    (5, None, "report_status", {}, True),
    (6, None, "no_such_command", {}, False),
    (7, contract.FLEET, "sync_now", {}, True),
]


DESIRED = {"version": 1, "config": {"gate.recovery_window_s": 86400}}


def operate(broker: Mosquitto, operator: Ed25519PrivateKey, gate: str,
            sniffer: Sniffer) -> list[dict[str, Any]]:
    """Commands through the operator tool's own code (headend/command.py), then a signed
    desired state, retained; returns the answers the tool printed."""
    where = Broker(broker.host, broker.port)
    answers = []
    for seq, target, name, args, _ in OPERATIONS:
        out = io.StringIO()
        fleet = target == contract.FLEET
        command.send(where, operator, keys.key_id(operator), command.Request(
            target=target or gate, name=name, args=args, seq=seq, ttl_s=60,
            timeout_s=2.0 if fleet else 20.0), out)
        printed = [json.loads(line) for line in out.getvalue().splitlines()]
        assert printed, f"no answer to {name} seq {seq}"
        answers.append(next(a for a in printed if a["gate"] == gate))
    now = int(time.time() * 1000)
    body = contract.CommandBody(gate, 100, now, now + 600_000, "desired", DESIRED)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                         client_id=f"asyncapi-operator-{gate}")
    client.connect(broker.host, broker.port, 30, clean_start=True)
    client.loop_start()
    try:
        info = client.publish(contract.desired_topic(gate), command.sign(
            operator, keys.key_id(operator), body).encode(), qos=1, retain=True)
        info.wait_for_publish(10)
        reported = contract.reported_topic(gate)
        sniffer.wait("the reported desired version", lambda: any(
            s.json().get("version") == DESIRED["version"] for s in sniffer.on(reported)))
        # clear the retained desired state: the broker outlives this test
        client.publish(contract.desired_topic(gate), b"", qos=1, retain=True
                       ).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return answers


def test_what_a_real_gate_and_head_end_publish_matches_the_document(
        tmp_path: Path, mosquitto: Mosquitto, doc: dict[str, Any], schemas: Schemas) -> None:
    # (a prefix of its own: a gate id another module used would resume that gate's
    # persistent session, and the commands queued for it)
    gate = f"0000A{os.getpid() % 0xFFFF:04X}{next(_gate_numbers):03X}"
    key_path = tmp_path / "device.pem"
    key = devicekey.generate(key_path)
    # a journal with every kind of entry, signed, made beforehand by the same gate
    signed = SignedGate(tmp_path / "gate", bytes.fromhex(gate), key=key)
    signed.ride(20)
    before = signed.entries()
    journal_path = signed.rig.journal_path
    signed.close()

    operator = Ed25519PrivateKey.generate()
    sniffer = Sniffer(mosquitto, contract.topic(gate, "#"), contract.fleet_cmd_topic(),
                      contract.topic(contract.FLEET, "reply/#"))
    config = daemon_config(tmp_path, gate, mosquitto, journal_path, key_path, operator)
    status_topic, tx_topic, ack_topic = (contract.status_topic(gate), contract.tx_topic(gate),
                                         contract.ack_topic(gate))
    try:
        with headend_consumer(tmp_path, mosquitto, gate, key.public_key()):
            daemon = Daemon(config)
            try:
                def acked() -> set[str]:
                    return {u for s in sniffer.seen if s.topic == ack_topic
                            for u in s.json()["stored"]}

                def tapped() -> bool:
                    online = [s.json() for s in sniffer.seen if s.topic == status_topic]
                    return any(sum(s["telemetry"].get("taps", {}).values()) >= 8
                               for s in online if s["state"] == contract.ONLINE)

                sniffer.wait("the journal drained and acked, and telemetry with taps",
                             lambda: {e["uuid"] for e in before} <= acked() and tapped(),
                             daemon.tail)
                answers = operate(mosquitto, operator, gate, sniffer)
            finally:
                rc = daemon.stop()
            assert rc == 0, daemon.tail()
            sniffer.wait("the offline status of a clean stop", lambda: any(
                s.json()["state"] == contract.OFFLINE for s in sniffer.on(status_topic)))

            # again, killed: the broker publishes the Last Will
            daemon = Daemon(config)
            onlines = len(sniffer.on(status_topic))
            try:
                sniffer.wait("the second run's online status",
                             lambda: len(sniffer.on(status_topic)) > onlines, daemon.tail)
            finally:
                daemon.kill()
            sniffer.wait("the Last Will", lambda: any(
                s.json()["telemetry"].get("reason") == "connection lost"
                for s in sniffer.on(status_topic)))
        export = subprocess.run([sys.executable, "-m", "daemon.cli", "journal", "export",
                                 "--config", str(config)], cwd=ROOT, capture_output=True,
                                text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                timeout=TIMEOUT_S, check=False)
    finally:
        sniffer.close()

    # every message seen is on a documented channel and matches one of its messages
    counts: Counter[str] = Counter()
    for seen in sniffer.seen:
        cid = channel_of(doc, seen.topic)
        if not seen.payload and cid == "desired":
            continue  # the test's own clearing of the retained desired state
        payload = seen.json()
        names = message_names(doc, cid)
        ok = [n for n in names if schemas.valid(f"#/components/messages/{n}/payload", payload)]
        if len(ok) != 1:
            for n in names:
                schemas.check(n, payload)  # fails, saying why
        counts[ok[0]] += 1
    assert counts["statusOnline"] >= 2 and counts["statusOffline"] >= 2, counts
    assert counts["batch"] >= 3 and counts["ack"] >= 3, counts
    assert counts["signedCommand"] == len(OPERATIONS) and counts["desired"] == 1, counts
    assert counts["reply"] == len(OPERATIONS) and counts["reported"] >= 1, counts
    # on connect, retained (the second run may be killed before it sends its own)
    assert counts["info"] >= 1, counts
    assert all(s.retain for s in sniffer.on(contract.info_topic(gate)))

    # commands: what the gate did, and every answer on the command's Response Topic
    # (one level under the target's reply topic, the nonce = the Correlation Data)
    assert [a["ok"] for a in answers] == [op[-1] for op in OPERATIONS], answers
    assert answers[1]["reason"] == "replayed" and answers[6]["reason"] == "unknown command"
    binding = doc["components"]["messages"]["signedCommand"]["bindings"]["mqtt"]
    response_pattern = re.compile(binding["responseTopic"]["pattern"])
    commands = [s for s in sniffer.seen if s.topic.endswith("/cmd")]
    replies = [s for s in sniffer.seen if "/reply/" in s.topic]
    for cmd in commands:
        assert cmd.response_topic is not None and response_pattern.fullmatch(cmd.response_topic)
        assert cmd.correlation is not None
        assert cmd.response_topic.rsplit("/", 1)[1] == cmd.correlation.hex()
        # a fleet command's too: under the gate's own reply topic, which names it
        (reply,) = [r for r in replies
                    if r.topic == f"{contract.reply_topic(gate)}/{cmd.correlation.hex()}"]
        assert reply.correlation == cmd.correlation and not reply.retain
    assert not [r for r in replies if r.topic.startswith(contract.reply_topic(contract.FLEET))]
    assert all(s.retain for s in sniffer.on(contract.reported_topic(gate)))

    # status: retained, QoS 1 per the document, the offline ones with their reasons
    statuses = sniffer.on(status_topic)
    assert all(s.retain for s in statuses)
    reasons = {s.json()["telemetry"].get("reason") for s in statuses
               if s.json()["state"] == contract.OFFLINE}
    assert reasons == {"stopped", "connection lost"}
    # the second run's first status: what operators changed survived the restart
    last_online = [s.json() for s in statuses if s.json()["state"] == contract.ONLINE][-1]
    telemetry_schema = doc["components"]["schemas"]["Telemetry"]
    assert set(last_online["telemetry"]) == set(telemetry_schema["properties"]), (
        "the telemetry's keys differ from the document's")
    assert last_online["telemetry"]["remote"]["desired_version"] == DESIRED["version"]
    assert last_online["telemetry"]["remote"]["deny_list"] == {"version": 1, "size": 1}

    # batches: Response Topic = the ack topic, Correlation Data = the batch id; the entries
    # cover every kind, signed
    response_pattern = re.compile(
        doc["components"]["messages"]["batch"]["bindings"]["mqtt"]["responseTopic"]["pattern"])
    sent: Counter[str] = Counter()
    for seen in sniffer.on(tx_topic):
        batch = seen.json()
        assert seen.response_topic == ack_topic and response_pattern.fullmatch(ack_topic)
        assert seen.correlation == batch["batch"].encode()
        assert batch["gate"] == gate and not seen.retain
        sent.update(f"{e['kind']}/{e['state']}" for e in batch["entries"])
        assert all(e["sig"] is not None for e in batch["entries"])
    assert {"debit/intent", "debit/completed", "debit/torn", "recovery/recovered",
            "pass/completed", "refusal/refused"} <= set(sent), sent

    # acks: the batch's Correlation Data back, nothing suspect in a clean journal
    batch_ids = {s.json()["batch"] for s in sniffer.on(tx_topic)}
    for seen in sniffer.on(ack_topic):
        ack = seen.json()
        assert ack["batch"] in batch_ids and seen.correlation == ack["batch"].encode()
        assert ack["problems"] == {}, ack["problems"]

    # `tapgate journal export`: the same entries, with their sync state
    assert export.returncode == 0, export.stderr
    lines = [json.loads(line) for line in export.stdout.splitlines()]
    assert len(lines) > len(before)
    for entry in lines:
        assert entry.get("sync_state") in ("pending", "synced"), entry
        assert schemas.valid("#/components/schemas/Entry", entry), schemas.errors(
            "#/components/schemas/Entry", entry)
