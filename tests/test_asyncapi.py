"""docs/asyncapi.yaml against the code: the MQTT contract as documented is the one spoken.

* The document is a structurally sound AsyncAPI 3 document: required keys, every $ref
  resolves, every operation names an existing channel and messages of that channel,
  channel parameters match their addresses, the schemas are valid JSON Schema (draft 7,
  what AsyncAPI schemas build on) and the examples match them.
* Every topic daemon/sync/contract.py makes has exactly one channel, and every channel
  is a topic the code makes.
* Real messages validate against the documented schemas: a real daemon (sim reader,
  signed journal, with a journal of signed taps, tears and recoveries made beforehand)
  publishes its status, batches and Last Will to a real mosquitto, the real head-end
  consumer acks them, the operator tool's signed commands are answered; everything is
  captured off the broker, MQTT v5 properties included. Broken messages must fail.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import itertools
import json
import os
import re
import signal
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

import jsonschema
import paho.mqtt.client as mqtt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from daemon import devicekey
from daemon.journal.entry import ENTRY_FIELDS
from daemon.sync import contract
from headend import command, keys
from headend.consumer import Consumer
from headend.mqtt import Broker
from headend.store import Store
from headend.verify import Verifier
from tests.fixtures.mosquitto import Mosquitto
from tests.gate_stub import SignedGate
from tests.helpers import MASTER_TAC_KEY, raw_config, toml_text

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "asyncapi.yaml"
DOC_URI = "urn:tapgate:asyncapi"
TIMEOUT_S = 60.0
SAMPLE_GATE = "000000A00001"
SAMPLE_NONCE = "00112233445566778899aabbccddeeff"
_gate_numbers = itertools.count(1)


# --- the document --------------------------------------------------------------------------
def load_doc() -> dict[str, Any]:
    doc = yaml.safe_load(DOC_PATH.read_text(encoding="utf-8"))
    assert isinstance(doc, dict), f"{DOC_PATH} is not a YAML mapping"
    return doc


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return load_doc()


def pointer(doc: dict[str, Any], ref: str) -> Any:
    """The node a local ``#/a/b`` reference points at (KeyError when it does not)."""
    assert ref.startswith("#/"), f"only local references are used here, not {ref!r}"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def refs(node: Any, where: str = "#") -> Iterator[tuple[str, str]]:
    """Every ``$ref`` in the document: (where it is, what it points at)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield where, value
            else:
                yield from refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from refs(value, f"{where}/{i}")


def deref(doc: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = pointer(doc, node["$ref"])
    return node


class Schemas:
    """The document's message payloads as jsonschema validators ($refs across the whole
    document resolve)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        resource = Resource.from_contents(doc, default_specification=DRAFT7)
        self.registry: Registry[Any] = Registry().with_resource(DOC_URI, resource)

    def validator(self, ref: str) -> jsonschema.Draft7Validator:
        return jsonschema.Draft7Validator({"$ref": f"{DOC_URI}{ref}"}, registry=self.registry)

    def errors(self, ref: str, instance: Any) -> list[str]:
        return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                for e in self.validator(ref).iter_errors(instance)]

    def check(self, message: str, instance: Any) -> None:
        """``instance`` is a valid payload of the message ``components/messages/<name>``."""
        found = self.errors(f"#/components/messages/{message}/payload", instance)
        assert not found, f"a real {message} does not match docs/asyncapi.yaml:\n" + "\n".join(
            found) + f"\n{json.dumps(instance, indent=1)[:3000]}"

    def valid(self, ref: str, instance: Any) -> bool:
        return not self.errors(ref, instance)


@pytest.fixture(scope="module")
def schemas(doc: dict[str, Any]) -> Schemas:
    return Schemas(doc)


def channel_regex(doc: dict[str, Any], channel: dict[str, Any]) -> re.Pattern[str]:
    """The channel's address as a regex: each ``{param}`` replaced by its x-pattern."""
    params = {name: deref(doc, p) for name, p in (channel.get("parameters") or {}).items()}
    out, pos = [], 0
    for m in re.finditer(r"\{([^}]+)\}", channel["address"]):
        out.append(re.escape(channel["address"][pos:m.start()]))
        pattern = params[m.group(1)]["x-pattern"]
        out.append("(?:" + pattern.removeprefix("^").removesuffix("$") + ")")
        pos = m.end()
    out.append(re.escape(channel["address"][pos:]))
    return re.compile("".join(out))


def channel_of(doc: dict[str, Any], topic: str) -> str:
    """The one channel whose address matches ``topic``."""
    found = [cid for cid, ch in doc["channels"].items()
             if channel_regex(doc, ch).fullmatch(topic)]
    assert len(found) == 1, f"topic {topic!r} matches channels {found}, not exactly one"
    return found[0]


def message_names(doc: dict[str, Any], channel_id: str) -> set[str]:
    """The components/messages names of a channel's messages."""
    names = set()
    for msg in doc["channels"][channel_id]["messages"].values():
        ref = msg["$ref"]
        assert ref.startswith("#/components/messages/"), ref
        names.add(ref.rsplit("/", 1)[1])
    return names


# --- the document is AsyncAPI 3 --------------------------------------------------------------
def test_the_document_has_what_asyncapi_3_requires(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] and doc["info"]["version"]
    assert doc["defaultContentType"] == "application/json"
    allowed = {"asyncapi", "id", "info", "servers", "defaultContentType", "channels",
               "operations", "components"}
    assert set(doc) <= allowed, set(doc) - allowed
    assert {"mqtt", "mqtts"} <= set(doc["servers"])
    for name, server in doc["servers"].items():
        assert server["host"] and server["protocol"] in ("mqtt", "mqtts"), name
        assert str(server["protocolVersion"]) == "5", name
        for variable in re.findall(r"\{([^}]+)\}", server["host"]):
            assert variable in server["variables"], (name, variable)
    (scheme,) = (deref(doc, s) for s in doc["servers"]["mqtts"]["security"])
    assert scheme["type"] == "X509"
    for name in ("channels", "operations"):
        assert isinstance(doc[name], dict) and doc[name], name


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    found = list(refs(doc))
    assert len(found) > 50
    broken = []
    for where, ref in found:
        try:
            pointer(doc, ref)
        except (KeyError, IndexError, TypeError):
            broken.append(f"{where}: {ref}")
    assert not broken, "unresolved $ref:\n" + "\n".join(broken)


def test_channels_declare_exactly_the_parameters_their_addresses_use(
        doc: dict[str, Any]) -> None:
    for cid, channel in doc["channels"].items():
        used = set(re.findall(r"\{([^}]+)\}", channel["address"]))
        declared = set(channel.get("parameters") or {})
        assert used == declared, (cid, used, declared)
        for name in declared:
            param = deref(doc, channel["parameters"][name])
            pattern = re.compile(param["x-pattern"])
            for example in param["examples"]:
                assert pattern.fullmatch(str(example)), (cid, name, example)
        assert channel["messages"], cid
        for msg in channel["messages"].values():
            assert "payload" in deref(doc, msg), (cid, msg)


def test_operations_name_existing_channels_and_their_messages(doc: dict[str, Any]) -> None:
    used_channels = set()

    def check(where: str, channel_ref: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        ref = channel_ref["$ref"]
        assert ref.startswith("#/channels/"), (where, ref)
        cid = ref.removeprefix("#/channels/")
        assert cid in doc["channels"], (where, ref)
        used_channels.add(cid)
        assert messages, where
        for msg in messages:
            # AsyncAPI 3: an operation's messages are a subset of its channel's
            assert msg["$ref"].startswith(f"#/channels/{cid}/messages/"), (where, msg)
            pointer(doc, msg["$ref"])

    for oid, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), oid
        check(oid, op["channel"], op["messages"])
        if "reply" in op:
            check(f"{oid} reply", op["reply"]["channel"], op["reply"]["messages"])
        mqtt_binding = op["bindings"]["mqtt"]
        assert mqtt_binding["qos"] in (0, 1, 2), oid
    assert used_channels == set(doc["channels"]), "channels no operation uses: " + str(
        set(doc["channels"]) - used_channels)
    # from the gate's point of view
    actions = {oid: op["action"] for oid, op in doc["operations"].items()}
    gate_sends = {op["channel"]["$ref"].rsplit("/", 1)[1] for op in doc["operations"].values()
                  if op["action"] == "send"}
    assert gate_sends == {"status", "tx", "reply", "reported", "info"}, actions


def test_schemas_are_valid_json_schema_and_the_examples_match(
        doc: dict[str, Any], schemas: Schemas) -> None:
    for name, schema in doc["components"]["schemas"].items():
        jsonschema.Draft7Validator.check_schema(schema)
        assert "description" in schema or "$ref" in schema or "pattern" in schema, name
    examples = 0
    for name, message in doc["components"]["messages"].items():
        assert message["name"] == name
        assert message["bindings"]["mqtt"]["bindingVersion"] == "0.2.0", name
        for example in message.get("examples", []):
            schemas.check(name, example["payload"])
            examples += 1
    assert examples >= 8


def test_the_last_will_is_an_offline_status(doc: dict[str, Any], schemas: Schemas) -> None:
    binding = doc["components"]["serverBindings"]["gate"]
    will = binding["lastWill"]
    assert will["topic"] == doc["channels"]["status"]["address"]
    assert (will["qos"], will["retain"], binding["cleanSession"]) == (1, True, False)
    assert "connection lost" in will["message"]


def test_the_entry_schema_has_every_entry_field(doc: dict[str, Any]) -> None:
    entry = doc["components"]["schemas"]["Entry"]
    assert set(entry["required"]) == set(ENTRY_FIELDS)
    assert set(entry["properties"]) == set(ENTRY_FIELDS) | {"sync_state"}
    assert entry["additionalProperties"] is False


# --- topics: contract.py <-> channels -----------------------------------------------------------
def contract_topics() -> dict[str, list[str]]:
    """Every ``*_topic`` function of contract.py -> the concrete topics it makes (a reply
    topic gets the nonce the operator tool appends, as headend/command.py does)."""
    out: dict[str, list[str]] = {}
    for name, fn in inspect.getmembers(contract, inspect.isfunction):
        if not name.endswith("_topic") or fn.__module__ != contract.__name__:
            continue
        params = list(inspect.signature(fn).parameters)
        if not params:
            topics = [fn()]
        else:
            assert params == ["gate"], f"contract.{name}{inspect.signature(fn)}: unexpected"
            targets = [SAMPLE_GATE, contract.FLEET] if name == "reply_topic" else [SAMPLE_GATE]
            topics = [fn(t) for t in targets]
        if name == "reply_topic":
            topics = [f"{t}/{SAMPLE_NONCE}" for t in topics]
        out[name] = topics
    return out


def test_every_contract_topic_has_one_channel_and_every_channel_a_topic(
        doc: dict[str, Any]) -> None:
    made = contract_topics()
    assert len(made) >= 9, sorted(made)
    matched = {name: {channel_of(doc, t) for t in topics} for name, topics in made.items()}
    for name, channels in matched.items():
        assert len(channels) == 1, (name, channels)
    covered = set().union(*matched.values())
    assert covered == set(doc["channels"]), "channels no contract topic makes: " + str(
        set(doc["channels"]) - covered)
    # the head-end's shared subscription is the tx channel with the gate as a wildcard
    tx = doc["channels"]["tx"]["address"]
    assert "$share/headend/" + tx.replace("{gate}", "+") == contract.HEADEND_SHARE
    # gate ids and "fleet" cannot be confused
    assert not re.fullmatch(doc["components"]["parameters"]["gate"]["x-pattern"],
                            contract.FLEET)


def test_a_topic_the_contract_does_not_make_has_no_channel(doc: dict[str, Any]) -> None:
    for topic in ("tapgate/v1/000000a00001/tx", "tapgate/v1/000000A00001/rx",
                  "tapgate/v2/000000A00001/tx", "tapgate/v1/fleet/status",
                  "tapgate/v1/000000A00001/reply"):
        assert not any(channel_regex(doc, ch).fullmatch(topic)
                       for ch in doc["channels"].values()), topic


# --- broken messages fail ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def signed_entries(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    gate = SignedGate(tmp_path_factory.mktemp("asyncapi-gate"), bytes.fromhex(SAMPLE_GATE))
    try:
        gate.ride(20)
        return gate.entries()
    finally:
        gate.close()


def _lower(entry: dict[str, Any], key: str) -> dict[str, Any]:
    return {**entry, key: entry[key].lower()}


def _without(entry: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != key}


ENTRY_BREAKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "lowercase hash": lambda e: _lower(e, "hash"),
    "lowercase terminal id": lambda e: _lower(e, "terminal_id"),
    "lowercase tac": lambda e: _lower(e, "tac"),
    "short card serial": lambda e: {**e, "card_serial": e["card_serial"][:-2]},
    "no uuid": lambda e: _without(e, "uuid"),
    "no sig (null is not absent)": lambda e: _without(e, "sig"),
    "amount as a string": lambda e: {**e, "amount": str(e["amount"])},
    "amount as a float": lambda e: {**e, "amount": e["amount"] + 0.5},
    "unknown kind": lambda e: {**e, "kind": "refund"},
    "state of another kind": lambda e: {**e, "state": "refused"},
    "date with dashes": lambda e: {**e, "tx_date": "2026-05-04"},
    "an extra field": lambda e: {**e, "fare_zone": 3},
    "sync state unknown": lambda e: {**e, "sync_state": "maybe"},
    "uuid with dashes": lambda e: {**e, "uuid": "-".join(
        (e["uuid"][:8], e["uuid"][8:12], e["uuid"][12:16], e["uuid"][16:20], e["uuid"][20:]))},
}


def test_real_entries_validate_and_broken_ones_do_not(
        schemas: Schemas, signed_entries: list[dict[str, Any]]) -> None:
    kinds = Counter(f"{e['kind']}/{e['state']}" for e in signed_entries)
    assert {"debit/intent", "debit/completed", "debit/torn", "recovery/recovered",
            "pass/completed", "refusal/refused"} <= set(kinds), kinds
    entry_ref = "#/components/schemas/Entry"
    for entry in signed_entries:
        assert schemas.valid(entry_ref, entry), schemas.errors(entry_ref, entry)
        assert schemas.valid(entry_ref, {**entry, "sync_state": "pending"})
    debit = next(e for e in signed_entries if (e["kind"], e["state"]) == ("debit", "completed"))
    for what, breaks in ENTRY_BREAKS.items():
        broken = breaks(copy.deepcopy(debit))
        assert not schemas.valid(entry_ref, broken), f"{what}: passed the Entry schema"
    # and inside a batch
    batch = json.loads(contract.Batch(SAMPLE_GATE, "0badcafe-1", [debit]).encode())
    schemas.check("batch", batch)
    for broken_batch in ({**batch, "entries": [_lower(debit, "prev_hash")]},
                         {**batch, "gate": "000000a00001"}, {**batch, "entries": []},
                         _without(batch, "batch")):
        assert not schemas.valid("#/components/messages/batch/payload", broken_batch)


def test_broken_acks_commands_replies_and_statuses_fail(schemas: Schemas) -> None:
    def payload(name: str) -> str:
        return f"#/components/messages/{name}/payload"

    ack = json.loads(contract.Ack("0badcafe-1", ["0" * 32], {}).encode())
    schemas.check("ack", ack)
    assert not schemas.valid(payload("ack"), _without(ack, "stored"))
    assert not schemas.valid(payload("ack"), {**ack, "stored": "0" * 32})

    key = Ed25519PrivateKey.generate()
    body = contract.CommandBody(SAMPLE_GATE, 1, 1_000, 61_000, "sync_now", {})
    signed = json.loads(command.sign(key, keys.key_id(key), body).encode())
    schemas.check("signedCommand", signed)
    for broken in ({**signed, "sig": signed["sig"][:-2]},
                   {**signed, "key_id": "operator-1"},
                   _without(signed, "key_id"),
                   {**signed, "body": _without(signed["body"], "expires_at")},
                   {**signed, "body": {**signed["body"], "target": "000000a00001"}},
                   {**signed, "body": {**signed["body"], "seq": "1"}},
                   {**signed, "body": {**signed["body"], "args": {"now": True}}}):
        assert not schemas.valid(payload("signedCommand"), broken), broken

    reply = json.loads(contract.Reply(SAMPLE_GATE, 1, True).encode())
    schemas.check("reply", reply)
    assert not schemas.valid(payload("reply"), {**reply, "ok": "true"})
    assert not schemas.valid(payload("reply"), _without(reply, "reason"))

    offline = json.loads(contract.Status(SAMPLE_GATE, contract.OFFLINE, 1,
                                         {"reason": "stopped"}).encode())
    schemas.check("statusOffline", offline)
    assert not schemas.valid(payload("statusOnline"), offline)
    assert not schemas.valid(payload("statusOffline"), {**offline, "ts": 1.5})
    assert not schemas.valid(payload("statusOffline"), {**offline, "telemetry": {}})
    online = json.loads(contract.Status(SAMPLE_GATE, contract.ONLINE, 1, {
        "uplink": {"connects": 1, "batches_sent": 0, "entries_sent": 0, "entries_acked": 0,
                   "resends": 0}}).encode())
    schemas.check("statusOnline", online)
    assert not schemas.valid(payload("statusOnline"), {**online, "telemetry": {}})
    assert not schemas.valid(payload("statusOnline"), {
        **online, "telemetry": {**online["telemetry"], "taps": {"accepted": -1}}})


def test_a_signed_desired_document_validates(schemas: Schemas) -> None:
    key = Ed25519PrivateKey.generate()
    body = contract.CommandBody(SAMPLE_GATE, 7, 1_000, 10**13, "desired",
                                {"version": 3, "config": {"gate.anti_passback_s": 120}})
    desired = json.loads(command.sign(key, keys.key_id(key), body).encode())
    schemas.check("desired", desired)
    fleet = {**desired, "body": {**desired["body"], "target": contract.FLEET}}
    assert not schemas.valid("#/components/messages/desired/payload", fleet)


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


class DaemonProcess:
    """`python -m daemon.cli run` of this checkout, its log kept for failure messages."""

    def __init__(self, config: Path, log: Path) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        env.pop("NOTIFY_SOCKET", None)
        self.log = log
        self._out = log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config",
                                      str(config)], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=self._out)

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return f"daemon rc={self.proc.poll()}; its log ends:\n" + "\n".join(lines[-30:])

    def end(self, sig: int) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(TIMEOUT_S)
        finally:
            self._out.close()


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
    gate = f"0000D{os.getpid() % 0xFFFF:04X}{next(_gate_numbers):03X}"
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
            daemon = DaemonProcess(config, tmp_path / "daemon.log")
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
                rc = daemon.end(signal.SIGTERM)
            assert rc == 0, daemon.tail()
            sniffer.wait("the offline status of a clean stop", lambda: any(
                s.json()["state"] == contract.OFFLINE for s in sniffer.on(status_topic)))

            # again, killed: the broker publishes the Last Will
            daemon = DaemonProcess(config, tmp_path / "daemon.log")
            onlines = len(sniffer.on(status_topic))
            try:
                sniffer.wait("the second run's online status",
                             lambda: len(sniffer.on(status_topic)) > onlines, daemon.tail)
            finally:
                daemon.end(signal.SIGKILL)
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
        (reply,) = [r for r in replies if r.topic == cmd.response_topic]
        assert reply.correlation == cmd.correlation and not reply.retain
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
