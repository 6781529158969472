"""The head-end's tool beyond storing: `run` over TLS with client certificates (and
refused by the broker without one), `keygen` and the operator's signed `command`s
answered by a gate stand-in, and key files refused when others may read them.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from headend import keys
from protocol import contract
from tests.cards import MASTER_TAC_KEY
from tests.fixtures.mosquitto import Mosquitto
from tests.gate_stub import GateStub, SignedGate, batches
from tests.headend_support import READY, ROOT, Headend, env, headend, uuids_of
from tests.pki import make_pki


# --- TLS -----------------------------------------------------------------------------------
def test_over_tls_with_client_certificates(
        tmp_path: Path, make_broker: Callable[..., Mosquitto],
        gates: Callable[..., SignedGate]) -> None:
    gate = gates(taps=4)
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    pki = make_pki(pki_dir, "headend", gate.gate)
    broker = make_broker(  # user root: the files are in pytest's private temp dir
        "user root\nlistener {port} 127.0.0.1\n"
        f"cafile {pki['ca'][0]}\ncertfile {pki['server'][0]}\nkeyfile {pki['server'][1]}\n"
        "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n")
    ca = pki["ca"][0]
    h = Headend(tmp_path, broker, tmp_path / "tls.db", name="h1", args=(
        "--tls-ca", str(ca), "--tls-cert", str(pki["headend"][0]),
        "--tls-key", str(pki["headend"][1])))
    try:
        h.start()
        assert "mqtts://127.0.0.1" in h.log()
        stub = GateStub(broker.host, broker.port, gate.gate,
                        tls=(ca, pki[gate.gate][0], pki[gate.gate][1]))
        try:
            acks = stub.sync(batches(gate.entries(), 5))
        finally:
            stub.close()
        assert sorted(u for a in acks.values() for u in a.stored) == sorted(
            uuids_of(gate.entries()))
        h.stop()
    finally:
        h.kill()
    # without a client certificate the broker refuses the head-end: it says so and retries
    bare = Headend(tmp_path, broker, tmp_path / "tls.db", name="h2",
                   args=("--tls-ca", str(ca)))
    with bare.log_path.open("ab") as log:
        bare.proc = subprocess.Popen(bare.argv, cwd=ROOT, env=env(), stdout=log,
                                     stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while "disconnected" not in bare.log() and "refused" not in bare.log():
            assert time.monotonic() < deadline, bare.log()
            time.sleep(0.1)
        assert READY not in bare.log()
    finally:
        bare.stop()


# --- commands ------------------------------------------------------------------------------
class CommandResponder:
    """The gate's side of commands, as far as these tests need it: checks the operator's
    Ed25519 signature over the canonical body, the key id, the target, the expiry and
    replay, and answers with the correlation data under its own reply topic, with the
    response topic's last level (daemon.sync.commands). ``forge``: also answer a fleet
    command on the fleet's reply topic, in the name of a gate that never saw it."""

    def __init__(self, broker: Mosquitto, gate: str,
                 operators: dict[str, Ed25519PublicKey], *, forge: str = "") -> None:
        self.gate = gate
        self.forge = forge
        self.operators = operators
        self.applied: set[int] = set()
        self.seen: list[tuple[str, dict[str, Any], str, bytes]] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"gate-{gate}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, 30, clean_start=True)
        self.client.loop_start()
        self.client.subscribe([(contract.cmd_topic(gate), SubscribeOptions(qos=1)),
                               (contract.fleet_cmd_topic(), SubscribeOptions(qos=1))])
        assert self._subscribed.wait(10)

    def _check(self, topic: str, cmd: dict[str, Any]) -> tuple[int | None, str]:
        body = cmd["body"]
        seq = body.get("seq")
        key = self.operators.get(cmd["key_id"])
        if key is None:
            return seq, "unknown key id"
        try:
            key.verify(bytes.fromhex(cmd["sig"]), contract.canonical(body))
        except (InvalidSignature, ValueError):
            return seq, "bad signature"
        if body["target"] not in (self.gate, contract.FLEET) or (
                topic == contract.fleet_cmd_topic()) != (body["target"] == contract.FLEET):
            return seq, "not for this gate"
        if body["expires_at"] < time.time() * 1000:
            return seq, "expired"
        if seq in self.applied:
            return seq, "replayed"
        self.applied.add(seq)
        return seq, ""

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        cmd = json.loads(msg.payload)
        response = msg.properties.ResponseTopic  # type: ignore[union-attr]
        correlation = msg.properties.CorrelationData  # type: ignore[union-attr]
        self.seen.append((msg.topic, cmd, response, correlation))
        seq, refusal = self._check(msg.topic, cmd)
        reply = contract.Reply(gate=self.gate, seq=seq, ok=not refusal, reason=refusal,
                               result={"name": cmd["body"]["name"], "args": cmd["body"]["args"]})
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = correlation
        nonce = response.rsplit("/", 1)[1]
        client.publish(f"{contract.reply_topic(self.gate)}/{nonce}", reply.encode(), qos=1,
                       properties=props)
        if self.forge and msg.topic == contract.fleet_cmd_topic():
            forged = contract.Reply(gate=self.forge, seq=seq, ok=True, reason="", result={})
            client.publish(response, forged.encode(), qos=1, properties=props)
            client.publish(f"{contract.reply_topic(self.gate)}/{nonce}", forged.encode(),
                           qos=1, properties=props)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_command_signing_round_trip(tmp_path: Path, broker: Mosquitto) -> None:
    key_path = tmp_path / "operator.pem"
    made = headend("keygen", "--out", str(key_path))
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert key_path.stat().st_mode & 0o777 == 0o600
    public = keys.public_from_hex(info["public_key"])
    assert info["key_id"] == info["public_key"][:16]
    assert headend("keygen", "--out", str(key_path)).returncode == 2  # never overwritten

    state = env(XDG_STATE_HOME=str(tmp_path / "state"))
    gate = "000000A00001"
    responders = [CommandResponder(broker, gate, {info["key_id"]: public}),
                  CommandResponder(broker, "000000A00002", {info["key_id"]: public},
                                   forge="000000A00003")]
    common = ["--broker", f"{broker.host}:{broker.port}", "--key-file", str(key_path),
              "--key-id", info["key_id"], "--timeout", "10"]
    try:
        sent = headend("command", gate, "set", "fare=300", "label=north gate",
                       'deny=["8801000000000001"]', *common, env=state)
        assert sent.returncode == 0, sent.stderr
        reply = json.loads(sent.stdout)
        assert reply == {"gate": gate, "seq": 1, "ok": True, "reason": "",
                         "result": {"name": "set", "args": {
                             "fare": 300, "label": "north gate",
                             "deny": ["8801000000000001"]}}}
        topic, cmd, response, correlation = responders[0].seen[0]
        assert topic == contract.cmd_topic(gate)
        assert response.startswith(contract.reply_topic(gate) + "/") and correlation
        body = cmd["body"]
        assert (body["target"], body["expires_at"] - body["issued_at"]) == (gate, 60_000)
        assert responders[1].seen == []  # another gate's command is not seen by this one

        # the sequence number persists between runs, and --seq moves it forward
        assert json.loads(headend("command", gate, "status", *common, env=state).stdout
                          )["seq"] == 2
        assert json.loads(headend("command", gate, "status", "--seq", "10", *common,
                                  env=state).stdout)["seq"] == 10
        assert json.loads(headend("command", gate, "status", *common, env=state).stdout
                          )["seq"] == 11
        # a replayed sequence number is refused by the gate: exit 3, the reason printed
        replay = headend("command", gate, "status", "--seq", "10", *common, env=state)
        assert replay.returncode == 3 and json.loads(replay.stdout)["reason"] == "replayed"
        # a key the gate does not know
        other = tmp_path / "other.pem"
        assert headend("keygen", "--out", str(other)).returncode == 0
        unknown = headend("command", gate, "status", *common[:2], "--key-file", str(other),
                          env=state)
        assert unknown.returncode == 3 and json.loads(unknown.stdout)["reason"] == (
            "unknown key id")
        # the fleet: every gate answers, each on its line; an answer in the name of a gate
        # that is not the one whose topic it came on is not taken
        fleet = headend("command", "fleet", "sync_now", *common[:-1], "2", env=state)
        assert fleet.returncode == 0, fleet.stderr
        answers = [json.loads(x) for x in fleet.stdout.splitlines()]
        assert sorted(a["gate"] for a in answers) == [gate, "000000A00002"]
        assert fleet.stderr.count("in the name of gate '000000A00003': ignored") == 2
        assert all(a["ok"] for a in answers)
        assert responders[1].seen[0][0] == contract.fleet_cmd_topic()
    finally:
        for r in responders:
            r.close()
    # nobody answers: exit 1 after the timeout
    silent = headend("command", "000000C00003", "status", *common[:-1], "1", env=state)
    assert silent.returncode == 1 and silent.stdout == ""
    assert "no answer" in silent.stderr


# --- key files -----------------------------------------------------------------------------
def test_key_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    tac = tmp_path / "tac.key"
    tac.write_text(MASTER_TAC_KEY.hex())
    tac.chmod(0o644)
    done = headend("run", "--broker", "127.0.0.1:1", "--db", f"sqlite:///{tmp_path}/h.db",
                   "--tac-key-file", str(tac))
    assert done.returncode == 2
    assert "--tac-key-file" in done.stderr and "readable by group or others" in done.stderr
    assert "chmod 600" in done.stderr
    assert not (tmp_path / "h.db").exists()  # refused before anything was opened

    tac.chmod(0o600)
    tac.write_text("00" * 8)
    short = headend("run", "--broker", "127.0.0.1:1", "--db", f"sqlite:///{tmp_path}/h.db",
                    "--tac-key-file", str(tac))
    assert short.returncode == 2 and "holds 8 bytes" in short.stderr

    operator = tmp_path / "op.pem"
    assert headend("keygen", "--out", str(operator)).returncode == 0
    operator.chmod(0o640)
    sent = headend("command", "000000A00001", "status", "--broker", "127.0.0.1:1",
                   "--key-file", str(operator))
    assert sent.returncode == 2 and "readable by group or others" in sent.stderr
