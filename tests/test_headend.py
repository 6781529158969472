"""The reference head-end storing and acknowledging against a real mosquitto:
`tapgate-headend run` as a separate process, fed by gates on the simulator whose journals
sign their entries (tests/gate_stub.py), then read back from its database and with
`export`.

Two head-ends in one test share one SQLite database (WAL, busy timeout, BEGIN
IMMEDIATE), as instances of a real deployment share one PostgreSQL: a gate's batches are
split between the instances of the shared subscription, and its chain can only be
checked, and its entries deduped, where all of them are.

The verdicts after the ack are in test_headend_verdicts.py; TLS, commands and key files
in test_headend_cli.py.
"""

from __future__ import annotations

import json
import signal
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from headend.verify import Verifier
from protocol import contract
from protocol.entry import ENTRY_FIELDS, chain_hash
from tests.cards import MASTER_TAC_KEY
from tests.gate_stub import GateStub, SignedGate, batches, reseal
from tests.headend_support import Headend, headend, rows, uuids_of, verified_rows


def export(db: Path, *args: str) -> list[dict[str, Any]]:
    done = headend("export", "--db", f"sqlite:///{db}", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


# --- storing and acknowledging -------------------------------------------------------------
def test_batches_are_stored_once_and_acked_after_storing(
        tmp_path: Path, gates: Callable[..., SignedGate], stubs: Callable[..., GateStub],
        run_headend: Callable[..., Headend], keyfiles: Callable[..., tuple[str, ...]]) -> None:
    gate = gates(taps=30)
    h = run_headend(*keyfiles(gate))
    entries = gate.entries()
    kinds = Counter(f"{e['kind']}/{e['state']}" for e in entries)
    assert kinds["recovery/recovered"] and kinds["pass/completed"] and kinds["refusal/refused"]

    # When the gate sees an ack, every entry it names must already be in the database.
    missing_at_ack: list[str] = []

    def check_stored(ack: contract.Ack) -> None:
        held = {r["uuid"] for r in rows(h.db, "SELECT uuid FROM entry")}
        missing_at_ack.extend(u for u in ack.stored if u not in held)

    stub = stubs(gate.gate, on_ack=check_stored)
    todo = batches(entries, 7)
    acks = stub.sync(todo)
    assert missing_at_ack == []
    for batch_id, chunk in todo:
        assert acks[batch_id].stored == uuids_of(chunk)
        assert acks[batch_id].problems == {}
        (got,) = stub.acks(batch_id)
        assert got.topic == contract.ack_topic(gate.gate)  # the batch's response topic
        assert got.correlation == batch_id.encode()  # with its correlation data

    stored = verified_rows(h.db)
    assert [r["uuid"] for r in stored] == uuids_of(entries)
    assert {(r["hash_state"], r["sig_state"], r["chain_state"]) for r in stored} == {
        ("ok", "ok", "linked")}
    debits = [r for r in stored if (r["kind"], r["state"]) in
              (("debit", "completed"), ("recovery", "recovered"))]
    assert debits and {r["tac_state"] for r in debits} == {"ok"}
    assert all(r["problems"] is None for r in stored)

    # A resend (the gate never saw the acks): acked again in full, stored no second time.
    again = stub.sync(todo)
    assert all(again[b].stored == uuids_of(chunk) for b, chunk in todo)
    assert len(rows(h.db)) == len(entries)
    for batch_id, chunk in todo:
        assert f"batch {batch_id} of {gate.gate}: 0 new, {len(chunk)} already stored" in h.log()
    state = rows(h.db, "SELECT * FROM gate")
    assert [(s["gate"], s["entries"], s["head_id"], s["contiguous_through"], s["pending"],
             s["broken"]) for s in state] == [(gate.gate, len(entries), len(entries),
                                               len(entries), 0, 0)]
    h.stop()


def test_batches_out_of_order_settle_the_chain(
        tmp_path: Path, gates: Callable[..., SignedGate], stubs: Callable[..., GateStub],
        run_headend: Callable[..., Headend], keyfiles: Callable[..., tuple[str, ...]]) -> None:
    gate = gates(taps=12)
    h = run_headend(*keyfiles(gate))
    stub = stubs(gate.gate)
    todo = batches(gate.entries(), 5)
    assert len(todo) >= 4
    stub.sync(todo[2:])  # the middle and the end first: their first entries wait
    waiting = [r for r in rows(h.db) if r["chain_state"] == "pending"]
    assert [r["entry_id"] for r in waiting] == [todo[2][1][0]["id"]]
    stub.sync(todo[:1])
    assert [r["chain_state"] for r in rows(h.db)].count("pending") == 1
    (gate_row,) = rows(h.db, "SELECT * FROM gate")
    assert (gate_row["contiguous_through"], gate_row["pending"]) == (len(todo[0][1]), 1)
    stub.sync(todo[1:2])
    stored = rows(h.db)
    assert {r["chain_state"] for r in stored} == {"linked"} and len(stored) == len(
        gate.entries())
    (gate_row,) = rows(h.db, "SELECT * FROM gate")
    assert (gate_row["contiguous_through"], gate_row["pending"], gate_row["broken"]) == (
        len(stored), 0, 0)
    h.stop(signal.SIGINT)


def test_suspect_entries_are_flagged_and_kept(
        tmp_path: Path, gates: Callable[..., SignedGate], stubs: Callable[..., GateStub],
        run_headend: Callable[..., Headend], keyfiles: Callable[..., tuple[str, ...]]) -> None:
    gate = gates(taps=6)
    bad_tac = gate.append_debit_with_tac(bytes(4))  # chained and signed, the TAC invented
    gate.ride(1)
    entries = gate.entries()
    assert entries[-3]["uuid"] == bad_tac["uuid"]
    i_hash, i_sig, i_chain = 2, 4, len(entries) - 1
    tampered = list(entries)
    tampered[i_hash] = {**entries[i_hash], "amount": 1}  # altered after it was hashed
    other = Ed25519PrivateKey.generate()
    tampered[i_sig] = {**entries[i_sig],  # same content, signed by another key
                       "sig": other.sign(bytes.fromhex(entries[i_sig]["hash"])).hex().upper()}
    # The last entry re-hashed and re-signed with the gate's key onto another chain: hash
    # and signature hold, the link to its predecessor does not.
    tampered[i_chain] = reseal({**entries[i_chain], "prev_hash": "AB" * 32}, gate.key)
    h = run_headend(*keyfiles(gate))
    stub = stubs(gate.gate)
    acks = stub.sync(batches(tampered, 4))
    # The gate's key is known, so its entries are checked before they are stored: the two
    # copies it disproves take no uuid and are named in no ack (their gate still holds
    # the real ones); the gate's own, suspect ones are stored and flagged.
    u = {name: tampered[i]["uuid"] for name, i in
         (("hash", i_hash), ("sig", i_sig), ("chain", i_chain))} | {"tac": bad_tac["uuid"]}
    named = {x for a in acks.values() for x in a.stored}
    assert named == set(uuids_of(tampered)) - {u["hash"], u["sig"]}
    problems = {x: why for a in acks.values() for x, why in a.problems.items()}
    assert problems == {
        u["hash"]: "not the gate's: hash does not match the entry's content",
        u["sig"]: "not the gate's: signature is not the gate's device key's",
        u["chain"]: "prev_hash is not the hash of the gate's previous entry",
        u["tac"]: "TAC is not the card's: the card did not make this debit"}
    assert [(r["uuid"], r["why"]) for r in export(h.db, "--rejected")] == [
        (u["hash"], problems[u["hash"]] + " (kept aside)"),
        (u["sig"], problems[u["sig"]] + " (kept aside)")]

    stored = {r["uuid"]: r for r in verified_rows(h.db)}
    assert set(stored) == named
    assert stored[u["chain"]]["chain_state"] == "broken"
    assert stored[u["chain"]]["tac_state"] != "bad"
    assert stored[u["tac"]]["tac_state"] == "bad"
    assert {x for x, r in stored.items() if r["problems"]} == {u["chain"], u["tac"]}
    # the successors of the two kept aside wait for their predecessors
    waiting = {r["entry_id"] for r in stored.values() if r["chain_state"] == "pending"}
    assert waiting == {entries[i_hash]["id"] + 1, entries[i_sig]["id"] + 1}
    # A resend is acked with every problem, and keeps nothing aside a second time.
    again = stub.sync(batches(tampered, 4))
    assert {x: w for a in again.values() for x, w in a.problems.items()} == problems
    assert len(export(h.db, "--rejected")) == 2
    (gate_row,) = rows(h.db, "SELECT * FROM gate")
    assert (gate_row["broken"], gate_row["pending"]) == (1, 2)
    # The gate's own copies: stored, acked, and the chain around them linked.
    ack = stub.sync([("own", [entries[i_hash], entries[i_sig]])])["own"]
    assert (ack.stored, ack.problems) == ([u["hash"], u["sig"]], {})
    stored = {r["uuid"]: r for r in verified_rows(h.db)}
    assert list(stored) == uuids_of(entries)
    assert {x for x, r in stored.items() if r["problems"]} == {u["chain"], u["tac"]}
    (gate_row,) = rows(h.db, "SELECT * FROM gate")
    assert (gate_row["broken"], gate_row["pending"], gate_row["contiguous_through"]) == (
        1, 0, len(entries))
    h.stop()


def test_malformed_messages_are_kept_aside(
        tmp_path: Path, gates: Callable[..., SignedGate], stubs: Callable[..., GateStub],
        run_headend: Callable[..., Headend]) -> None:
    gate = gates(taps=3)
    entries = gate.entries()
    h = run_headend()
    stub = stubs(gate.gate)
    stub.publish_raw(b"\xff not json")
    stub.publish("junk", [{"no": "uuid"}, 42])  # type: ignore[list-item]
    assert stub.wait_for_ack("junk", 10) == contract.Ack("junk", [], {})
    # the same uuid already stored with other content: kept aside, once however often it
    # comes, never named as stored (the ack says why): without the gate's key the
    # head-end cannot tell which copy is the gate's, and an ack must not make a gate take
    # its entry for stored when what is stored is another's
    acks = stub.sync(batches(entries, 10))
    clash = {**entries[0], "amount": 999}
    for _ in range(2):
        ack = stub.sync([("clash", [clash])])["clash"]
        assert ack.stored == [] and "other content" in ack.problems[clash["uuid"]]
    assert next(iter(acks.values())).stored == uuids_of(entries)
    rejected = export(h.db, "--rejected")
    assert [r["why"] for r in rejected] == [
        "not a batch: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
        "an entry without a valid uuid", "an entry is not a JSON object",
        "the uuid is already stored with other content; without the gate's key neither "
        "copy can be proven the gate's (kept aside)"]
    assert json.loads(rejected[3]["payload"]) == clash
    assert [r["uuid"] for r in rows(h.db)] == uuids_of(entries)
    assert json.loads(rows(h.db)[0]["entry_json"]) == entries[0]

    # A batch that names another gate than the topic it came on: stored under the topic's
    # gate (the one the broker let publish there), every entry flagged.
    gate.ride(1)
    fresh = gate.entries()[len(entries):]
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = contract.ack_topic(gate.gate)
    props.CorrelationData = b"liar"
    stub.publish_raw(contract.Batch(gate="000000FFFFFF", batch_id="liar",
                                    entries=fresh).encode(), props)
    liar = stub.wait_for_ack("liar", 10)
    assert liar is not None and liar.stored == uuids_of(fresh)
    assert all("says gate 000000FFFFFF" in liar.problems[u] for u in uuids_of(fresh))
    assert {r["gate"] for r in rows(h.db)} == {gate.gate}
    # An ack asked for on another gate's topic goes to this gate's ack topic instead.
    props.ResponseTopic = contract.cmd_topic("000000FFFFFF")
    props.CorrelationData = b"elsewhere"
    stub.publish_raw(contract.Batch(gate=gate.gate, batch_id="elsewhere",
                                    entries=fresh).encode(), props)
    assert stub.wait_for_ack("elsewhere", 10) is not None
    assert stub.acks("elsewhere")[0].topic == contract.ack_topic(gate.gate)
    h.stop()


def test_poison_batches_never_stop_the_headend(
        gates: Callable[..., SignedGate], stubs: Callable[..., GateStub],
        run_headend: Callable[..., Headend]) -> None:
    """What one compromised gate could send, again and again, to stop every head-end
    instance in turn and with them the fleet's sync: each is kept aside or stored as it
    came, and the batches after it are stored and acknowledged."""
    gate = gates(taps=2)
    entries = gate.entries()
    h = run_headend()
    stub = stubs(gate.gate)
    deep = b"[" * 100_000 + b"]" * 100_000
    stub.publish_raw(b'{"batch":"deep","entries":' + deep + b',"gate":"'
                     + gate.gate.encode() + b'"}')
    stub.publish("many", [{"uuid": f"{i:032x}"} for i in range(10_001)])
    # integers no database column holds: kept in the entry's JSON, not indexed
    huge = {**entries[0], "uuid": "F" * 32, "id": 2**64, "created_ms": 2**70}
    assert stub.sync([("huge", [huge])])["huge"].stored == ["F" * 32]
    acks = stub.sync(batches(entries, 10))
    assert next(iter(acks.values())).stored == uuids_of(entries)
    assert h.proc is not None and h.proc.poll() is None
    whys = [r["why"] for r in export(h.db, "--rejected")]
    assert len(whys) == 2
    assert whys[0].startswith("not a batch: maximum recursion depth exceeded")
    assert whys[1] == "not a batch: 10001 entries, more than a gate sends (10000)"
    stored = {r["uuid"]: r for r in rows(h.db)}
    assert set(stored) == {"F" * 32, *uuids_of(entries)}
    assert stored["F" * 32]["entry_id"] is None
    assert json.loads(stored["F" * 32]["entry_json"])["created_ms"] == 2**70
    h.stop()


def test_store_keeps_a_restarted_journal_and_flags_its_reused_ids(tmp_path: Path) -> None:
    """In process, no broker: a gate whose journal started over (ids from 1 again, same
    device key) is stored beside the old one, each reused id flagged; a uuid twice in one
    batch is stored once."""
    from headend.store import Store

    first = SignedGate(tmp_path / "first", bytes.fromhex("000000A00001"))
    first.ride(3)
    again = SignedGate(tmp_path / "again", bytes.fromhex("000000A00001"), key=first.key)
    again.ride(2)
    verifier = Verifier(tac_master_key=MASTER_TAC_KEY,
                        gate_keys={first.gate: [first.key.public_key()]})
    try:
        with Store(f"sqlite:///{tmp_path}/h.db") as store:
            old = first.entries()
            done = store.store_batch(gate=first.gate, batch_id="a", entries=[*old, old[0]],
                                     verifier=verifier, stored_by="t")
            assert (done.stored, done.new, done.problems) == (uuids_of(old), len(old), {})
            new = again.entries()
            done = store.store_batch(gate=first.gate, batch_id="b", entries=new,
                                     verifier=verifier, stored_by="t")
            assert done.new == len(new) and set(done.problems) == set(uuids_of(new))
            assert all(why.startswith("another entry of this gate has id")
                       for why in done.problems.values())
            lines = list(store.export())
            assert len(lines) == len(old) + len(new)
            assert {line["headend"]["chain"] for line in lines} == {"linked"}
            assert store.gates()[0]["entries"] == len(old) + len(new)
            # one uuid twice in a batch with different content: the first stored and
            # flagged, the second kept aside
            again.ride(1)
            e = again.entries()[-1]
            done = store.store_batch(gate=first.gate, batch_id="c",
                                     entries=[e, {**e, "amount": 1}], verifier=verifier,
                                     stored_by="t")
            assert (done.stored, done.new, done.rejected) == ([e["uuid"]], 1, 1)
            assert "twice in one batch" in done.problems[e["uuid"]]
            (line,) = [x for x in store.export() if x["uuid"] == e["uuid"]]
            assert line["amount"] == e["amount"]
            assert any("twice in one batch" in why for why in line["headend"]["problems"])
            assert [r["why"] for r in store.export_rejected()] == [
                "the uuid twice in one batch, with other content (kept aside)"]
    finally:
        first.close()
        again.close()


# --- export --------------------------------------------------------------------------------
def test_export_prints_what_was_stored(
        tmp_path: Path, gates: Callable[..., SignedGate], stubs: Callable[..., GateStub],
        run_headend: Callable[..., Headend], keyfiles: Callable[..., tuple[str, ...]]) -> None:
    a, b = gates("000000B00002", taps=8), gates("000000A00001", taps=5)
    h = run_headend(*keyfiles(a, b))
    for gate in (a, b):
        stubs(gate.gate).sync(list(reversed(batches(gate.entries(), 3))))
    verified_rows(h.db)
    h.stop()
    lines = export(h.db)
    expected = [(g.gate, e) for g in sorted((a, b), key=lambda g: g.gate) for e in g.entries()]
    assert [(line["gate"], line["uuid"]) for line in lines] == [
        (g, e["uuid"]) for g, e in expected]  # (gate, id) order, whatever the arrival order
    for line, (_, entry) in zip(lines, expected, strict=True):
        fields = {k: v for k, v in line.items() if k not in ("gate", "headend")}
        assert fields == entry  # exactly the gate's Entry.to_json()
        assert set(fields) == set(ENTRY_FIELDS)
        assert chain_hash(fields).hex().upper() == fields["hash"]  # recheckable from here
        assert line["headend"]["problems"] == [] and line["headend"]["chain"] == "linked"
        assert line["headend"]["sig"] == "ok" and line["headend"]["stored_by"] == "h1"
    assert [x["gate"] for x in export(h.db, "--gate", a.gate)] == [a.gate] * len(a.entries())
    gate_rows = headend("gates", "--db", f"sqlite:///{h.db}")
    assert [json.loads(x)["contiguous_through"] for x in gate_rows.stdout.splitlines()] == [
        len(b.entries()), len(a.entries())]


# --- several head-ends, crashes --------------------------------------------------------------
def test_two_headends_on_the_shared_subscription(
        tmp_path: Path, gates: Callable[..., SignedGate], stubs: Callable[..., GateStub],
        run_headend: Callable[..., Headend], keyfiles: Callable[..., tuple[str, ...]]) -> None:
    fleet = [gates(f"000000A0000{n}", taps=25) for n in range(1, 4)]
    opts = keyfiles(*fleet)
    h1, h2 = run_headend(*opts, name="h1"), run_headend(*opts, name="h2")
    assert h1.db == h2.db
    results: dict[str, dict[str, contract.Ack]] = {}

    def drain(gate: SignedGate) -> None:
        stub = stubs(gate.gate)
        results[gate.gate] = stub.sync(batches(gate.entries(), 4))
        # and everything once more, as a gate that lost its acks would
        results[gate.gate + "/again"] = stub.sync(batches(gate.entries(), 4))

    threads = [threading.Thread(target=drain, args=(g,)) for g in fleet]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    expected = [u for g in sorted(fleet, key=lambda g: g.gate) for u in uuids_of(g.entries())]
    for gate in fleet:
        for key in (gate.gate, gate.gate + "/again"):
            acked = [u for a in results[key].values() for u in a.stored]
            assert sorted(acked) == sorted(uuids_of(gate.entries()))
    stored = rows(h1.db)
    assert [r["uuid"] for r in stored] == expected  # each exactly once, none lost
    assert Counter(r["stored_by"] for r in stored).keys() == {"h1", "h2"}  # load shared
    assert {r["chain_state"] for r in stored} == {"linked"}
    assert all(r["problems"] is None for r in stored)
    assert [(s["entries"], s["pending"], s["broken"]) for s in rows(
        h1.db, "SELECT * FROM gate ORDER BY gate")] == [
        (len(g.entries()), 0, 0) for g in sorted(fleet, key=lambda g: g.gate)]
    h1.stop()
    h2.stop()


def test_headend_killed_between_storing_and_acking(
        tmp_path: Path, gates: Callable[..., SignedGate], stubs: Callable[..., GateStub],
        run_headend: Callable[..., Headend], keyfiles: Callable[..., tuple[str, ...]]) -> None:
    gate = gates(taps=15)
    entries = gate.entries()
    todo = batches(entries, 6)
    h = run_headend(*keyfiles(gate), first=("--test-crash-after-store", "2"))
    stub = stubs(gate.gate)
    assert stub.sync(todo[:1])
    stub.publish(*todo[1])
    assert h.wait() == -signal.SIGKILL
    assert "test hook: killed after storing batch " + todo[1][0] in h.log()
    # batch 2 is committed but was never acknowledged
    assert stub.wait_for_ack(todo[1][0], 1.0) is None
    assert [r["uuid"] for r in rows(h.db)] == uuids_of(todo[0][1] + todo[1][1])
    for batch_id, chunk in todo[2:]:  # published while no head-end listens
        stub.publish(batch_id, chunk)

    h.start()  # the same head-end, started again (without the test hook)
    acks = stub.sync(todo[1:])  # the gate resends what it has no ack for
    assert acks[todo[1][0]].stored == uuids_of(todo[1][1])  # the duplicates acked too
    assert [r["uuid"] for r in rows(h.db)] == uuids_of(entries)  # each stored once
    assert {r["chain_state"] for r in rows(h.db)} == {"linked"}
    assert f"batch {todo[1][0]} of {gate.gate}: 0 new, 6 already stored" in h.log()
    h.stop()
