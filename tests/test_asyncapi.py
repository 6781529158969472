"""docs/asyncapi.yaml against the code: the MQTT contract as documented is the one spoken.

* The document is a structurally sound AsyncAPI 3 document: required keys, every $ref
  resolves, every operation names an existing channel and messages of that channel,
  channel parameters match their addresses, the schemas are valid JSON Schema (draft 7,
  what AsyncAPI schemas build on) and the examples match them.
* Every topic protocol/contract.py makes has exactly one channel, and every channel
  is a topic the code makes.
* The messages the code makes in process (signed journal entries, batches, acks,
  commands, replies, statuses, a desired state) validate against the documented
  schemas. Broken messages must fail.

What a real gate and head-end publish on a real broker: test_asyncapi_live.py.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from headend import command, keys
from protocol import contract
from protocol.entry import ENTRY_FIELDS
from tests.asyncapi_support import Schemas, channel_of, channel_regex, deref, pointer
from tests.gate_stub import SignedGate

SAMPLE_GATE = "000000A00001"
SAMPLE_NONCE = "00112233445566778899aabbccddeeff"


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
