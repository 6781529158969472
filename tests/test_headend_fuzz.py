"""Fuzzing the head-end's intake: tx batches into :meth:`Store.store_batch` and whole
messages into the consumer (:meth:`Consumer.take`), in process, on SQLite in memory.

Inputs: random JSON, and real signed entries of two gates, mutated (fields dropped,
wrong types, huge integers, bad hex, lone surrogates and NULs, altered and re-hashed
the way a forger without the key would, uuids repeated with other content, another
gate's entries). Each store lives across a test's examples, so later batches meet what
earlier ones left. After every batch:

* nothing raised: every entry is stored or rejected with a reason;
* an ack names a uuid only when that uuid is stored, under this gate, with a content
  this batch sent;
* nothing under the keyed gate is stored that its key does not prove, and every real
  entry it ever sent is stored exactly as sent (no forged copy displaced or shadows it);
* each gate's counts (entries, pending, broken) are what its rows say.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headend import verify
from headend.consumer import Consumer
from headend.mqtt import parse_broker
from headend.store import Store, Stored
from headend.verify import Verifier
from protocol import contract
from protocol.contract import canonical_text
from tests.cards import MASTER_TAC_KEY
from tests.gate_stub import SignedGate, reseal

KEYED, OTHER = "000000A00001", "000000B00002"  # the verifier has the first's key only
QUICK, STORE_SLOW, CONSUMER_SLOW = 500, 14_000, 10_000  # 25,000 examples in all
STORE_LIFE = 300

Entries = list[dict[str, Any]]


@dataclass
class Pool:
    keyed: Entries
    other: Entries
    verifier: Verifier

    def __post_init__(self) -> None:
        self.real = {e["uuid"]: canonical_text(e) for e in self.keyed}


@dataclass
class Fed:
    """A store fed across examples (a new one every STORE_LIFE, so that the checks cost
    the same all along), and what the keyed gate really sent it."""

    store: Store
    sent: dict[str, str] = field(default_factory=dict)  # uuid -> the gate's content
    batches: int = 0

    def next(self) -> Store:
        self.batches += 1
        if self.batches % STORE_LIFE == 0:
            self.store.close()
            self.store = Store("sqlite:///:memory:").open()
            self.sent.clear()
        return self.store


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    made = tmp_path_factory.mktemp("fuzz-gates")
    a = SignedGate(made / "a", bytes.fromhex(KEYED))
    b = SignedGate(made / "b", bytes.fromhex(OTHER))
    try:
        a.ride(12)
        b.ride(4)
        yield Pool(keyed=a.entries(), other=b.entries(), verifier=Verifier(
            tac_master_key=MASTER_TAC_KEY, gate_keys={KEYED: [a.key.public_key()]}))
    finally:
        a.close()
        b.close()


@pytest.fixture
def fed() -> Iterator[Fed]:
    fed = Fed(Store("sqlite:///:memory:").open())
    yield fed
    fed.store.close()


# --- inputs -------------------------------------------------------------------------------
# Each entry is drawn as a few integers, read through these tables (a handful of choices
# per entry keeps an example cheap); random JSON is drawn only where it goes in.
ODD = ["\ud800", "a\udc00b", "\x00", "", "\u2028", "é" * 40, "Z" * 65, "00" * 31 + "ZZ",
       "0" * 63, "\U0001f600", 2**63, 2**64, -1, -(2**63) - 1, 2**200, 0, 1.5, float("inf"),
       None, True, [], {}]
TEXT = st.one_of(st.sampled_from([o for o in ODD if isinstance(o, str)]), st.text(max_size=8))
SCALAR = st.one_of(st.sampled_from(ODD), st.integers(-(2**70), 2**70), TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)), max_leaves=5)
FIELDS = ["uuid", "id", "prev_hash", "hash", "sig", "kind", "state", "amount", "tac",
          "card_serial", "terminal_id", "created_ms", "card_counter", "terminal_seq"]
HOWS = ["same", "drop", "retype", "odd", "forge", "forge-keep-sig", "alter", "uuid", "extra",
        "json", "id", "same", "forge"]
SOURCES = ["keyed", "keyed", "keyed", "other", "mutated", "mutated", "mutated", "json"]
PLAN = st.integers(0, 2**40)  # one choice: source, entry, how, which field, a value


def plan(n: int) -> tuple[str, int, str, str, int]:
    n, source = divmod(n, len(SOURCES))
    n, index = divmod(n, 64)
    n, how = divmod(n, len(HOWS))
    n, name = divmod(n, len(FIELDS))
    return SOURCES[source], index, HOWS[how], FIELDS[name], n % 10_000


def mutate(data: st.DataObject, entry: dict[str, Any], how: str, name: str,
           value: int) -> Any:
    out = dict(entry)
    if how == "drop":
        out.pop(name, None)
    elif how == "retype":
        out[name] = data.draw(JSON)
    elif how == "odd":
        out[name] = ODD[value % len(ODD)]
    elif how in ("forge", "forge-keep-sig"):  # altered and re-hashed, no key to sign it
        out = reseal({**out, "amount": value}, None)
        if how == "forge-keep-sig":
            out["sig"] = entry.get("sig")
    elif how == "alter":
        out["amount"] = value
    elif how == "uuid":
        out["uuid"] = ODD[value % len(ODD)] if value % 2 else f"{value:032x}"
    elif how == "extra":
        out[str(ODD[value % len(ODD)])] = data.draw(JSON)
    elif how == "json":
        return data.draw(JSON)
    elif how == "id":
        out["id"] = value % 40 - 2
    return out


def batch_of(data: st.DataObject, pool: Pool) -> list[Any]:
    out: list[Any] = []
    for kind, index, how, name, value in map(plan, data.draw(st.lists(PLAN, max_size=7))):
        if kind == "json":
            out.append(data.draw(JSON))
            continue
        entries = pool.other if kind == "other" else pool.keyed
        entry = entries[index % len(entries)]
        out.append(mutate(data, entry, how, name, value) if kind == "mutated"
                   else dict(entry))
    if out and data.draw(st.booleans()):  # a repeat within the batch
        out.append(out[data.draw(st.integers(0, len(out) - 1))])
    return out


# --- what must hold -----------------------------------------------------------------------
def check(fed: Fed, pool: Pool, gate: str, sent: list[Any], done: Stored) -> None:
    copies: dict[str, set[str]] = {}
    for obj in sent:
        p = verify.parse_entry(obj)
        if not isinstance(p, str):
            copies.setdefault(p.uuid, set()).add(p.text)
    stored, problems = set(done.stored), set(done.problems)
    assert set(copies) <= stored | problems, "an entry neither stored nor given a reason"
    assert stored <= set(copies)
    held = rows_of(fed, stored | set(fed.sent))
    for uuid in stored:
        assert held[uuid][0] == gate and held[uuid][1] in copies[uuid], (
            f"the ack names {uuid}, stored otherwise")
    if gate == KEYED:
        for uuid, texts in copies.items():
            if pool.real.get(uuid) in texts:
                fed.sent[uuid] = pool.real[uuid]
                held.update(rows_of(fed, {uuid}))
    for uuid, text in fed.sent.items():
        assert held.get(uuid) == (KEYED, text), f"the gate's own {uuid} lost"
    assert fed.store._sql(
        'SELECT COUNT(*) FROM "entry" WHERE "gate" = ? AND NOT ("hash_state" = \'ok\' '
        'AND "sig_state" = \'ok\')', (KEYED,)) == [(0,)], "an entry its key disproves"
    assert fed.store._sql(COUNTS, ()) == fed.store._sql(COUNTED, ()), "a gate's counts"


COUNTS = ('SELECT "gate", "entries", "pending", "broken" FROM "gate" WHERE "entries" > 0 '
          'ORDER BY "gate"')
COUNTED = ('SELECT "gate", COUNT(*), SUM(CASE WHEN "chain_state" = \'pending\' THEN 1 ELSE 0 '
           'END), SUM(CASE WHEN "chain_state" = \'broken\' THEN 1 ELSE 0 END) FROM "entry" '
           'GROUP BY "gate" ORDER BY "gate"')


def rows_of(fed: Fed, uuids: set[str]) -> dict[str, tuple[str, str]]:
    if not uuids:
        return {}
    return {u: (g, t) for u, g, t in fed.store._sql(
        'SELECT "uuid", "gate", "entry_json" FROM "entry" WHERE "uuid" IN '
        + "(" + ", ".join("?" * len(uuids)) + ")", sorted(uuids))}


def store_one(fed: Fed, pool: Pool, data: st.DataObject) -> None:
    gate = data.draw(st.sampled_from([KEYED, KEYED, OTHER]))
    sent = batch_of(data, pool)
    done = fed.next().store_batch(gate=gate, batch_id=data.draw(TEXT), entries=sent,
                                 verifier=pool.verifier, stored_by="fuzz",
                                 after_ack=data.draw(st.booleans()))
    check(fed, pool, gate, sent, done)


def payload_of(data: st.DataObject, pool: Pool, gate: str) -> bytes:
    how = data.draw(st.sampled_from(["batch", "batch", "batch", "envelope", "json", "bytes"]))
    if how == "bytes":
        return data.draw(st.binary(max_size=64))
    if how == "json":
        return json.dumps(data.draw(JSON)).encode()
    batch: dict[str, Any] = {"gate": gate, "batch": data.draw(TEXT),
                             "entries": batch_of(data, pool)}
    if how == "envelope":  # the envelope itself wrong
        batch[data.draw(st.sampled_from(["gate", "batch", "entries"]))] = data.draw(JSON)
    if data.draw(st.booleans()):
        return contract.canonical(batch)  # ASCII: surrogates as JSON escapes
    return json.dumps(batch, ensure_ascii=False).encode("utf-8", "surrogatepass")


def consume_one(consumer: Consumer, fed: Fed, pool: Pool, data: st.DataObject) -> None:
    gate = data.draw(st.sampled_from([KEYED, KEYED, OTHER]))
    payload = payload_of(data, pool, gate)
    consumer.store = fed.next()
    before = fed.store._sql('SELECT COUNT(*) FROM "rejected"', ())
    reply = consumer.take(contract.tx_topic(gate), payload,
                          response=data.draw(st.sampled_from(
                              [None, contract.ack_topic(gate), "elsewhere/ack",
                               contract.ack_topic("+")])),
                          correlation=data.draw(st.sampled_from([None, b"c"])))
    if reply is None:  # not a batch: kept aside, with why
        assert fed.store._sql('SELECT COUNT(*) FROM "rejected"', ()) > before
        return
    assert reply.topic.startswith(contract.topic(gate, "")) and "+" not in reply.topic
    reply.ack.encode()
    sent = json.loads(payload)["entries"]
    check(fed, pool, gate, sent, Stored(stored=reply.ack.stored, problems=reply.ack.problems))


def a_consumer(fed: Fed, pool: Pool) -> Consumer:
    return Consumer(store=fed.store, verifier=pool.verifier, broker=parse_broker("localhost"),
                    client_id="fuzz", info_subscription=None)


def run(examples: int, one: Callable[[st.DataObject], None]) -> None:
    settings(max_examples=examples, deadline=None, database=None, derandomize=False)(
        given(st.data())(one))()


# --- the tests ----------------------------------------------------------------------------
def test_batches_into_the_store(fed: Fed, pool: Pool) -> None:
    run(QUICK, lambda data: store_one(fed, pool, data))


def test_messages_into_the_consumer(fed: Fed, pool: Pool) -> None:
    consumer = a_consumer(fed, pool)
    run(QUICK, lambda data: consume_one(consumer, fed, pool, data))


@pytest.mark.slow
def test_many_batches_into_the_store(fed: Fed, pool: Pool) -> None:
    run(STORE_SLOW, lambda data: store_one(fed, pool, data))


@pytest.mark.slow
def test_many_messages_into_the_consumer(fed: Fed, pool: Pool) -> None:
    consumer = a_consumer(fed, pool)
    run(CONSUMER_SLOW, lambda data: consume_one(consumer, fed, pool, data))


def test_text_no_database_holds_is_refused_as_malformed(tmp_path: Path, pool: Pool) -> None:
    """A lone surrogate (JSON's "\\ud800") or a NUL: a uuid of one is refused as malformed,
    with why; in any other field it is kept in the entry's JSON, escaped; in a batch id
    it is stored escaped. No UnicodeEncodeError, nothing set aside with a traceback."""
    entry = pool.other[0]
    odd = [{**entry, "uuid": "\ud800"}, {**entry, "uuid": "a\x00b"},
           {**entry, "kind": "\udc00", "state": "x" * 40, "terminal_id": "\ud800"}]
    with Store(f"sqlite:///{tmp_path}/first.db") as store:
        done = store.store_batch(gate=OTHER, batch_id="\ud800", entries=odd,
                                 verifier=pool.verifier, stored_by="t")
        assert (done.stored, done.rejected) == ([entry["uuid"]], 2)
    with Store(f"sqlite:///{tmp_path}/h.db") as store:
        consumer = a_consumer(Fed(store), pool)
        payload = contract.canonical({"gate": OTHER, "batch": "b\ud800", "entries": odd})
        reply = consumer.take(contract.tx_topic(OTHER), payload)
        assert reply is not None and reply.ack.batch_id == "b\ud800"
        assert reply.correlation == "b\ud800".encode("utf-8", "surrogatepass")
        assert reply.ack.stored == [entry["uuid"]]
        assert [r["why"] for r in store.export_rejected()] == [
            "an entry whose uuid is not text (a lone surrogate or NUL)"] * 2
        (line,) = store.export()
        assert line["kind"] == "\udc00" and line["headend"]["batch"] == "b\\ud800"
        assert "terminal id \\ud800 is not this gate's" in line["headend"]["problems"]
