"""Forged copies of a gate's entries at the head-end: whoever can publish on a gate's tx
topic (the broker's ACL should stop them; the head-end does not count on it) must never
take a gate's entries from it, nor get an ack that makes the gate prune its own.

The outage: an attacker copies a gate's batches while the head-end is away and, when it
comes back, publishes altered copies under the same batch ids before the gate resends.
Against a real mosquitto and `tapgate-headend run`; the store's rules in process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from headend.verify import Verifier
from tests.cards import MASTER_TAC_KEY
from tests.gate_stub import GateStub, SignedGate, batches, reseal
from tests.headend_support import Headend, headend, rows, uuids_of

Entries = list[dict[str, Any]]


def forge(entries: Entries) -> Entries:
    """Altered copies, as one without the gate's device key can make them: the amount
    changed and the hash made again (unsigned, or the gate's old signature left on), or
    the content changed under the gate's own hash and signature."""
    out = []
    for i, e in enumerate(entries):
        changed = {**e, "amount": 1, "balance_after": 999_999}
        if i % 3 == 0:
            out.append(reseal(changed, None))
        elif i % 3 == 1:
            out.append({**reseal(changed, None), "sig": e["sig"]})
        else:
            out.append(changed)
    return out


def exported(db: Path, *args: str) -> Entries:
    done = headend("export", "--db", f"sqlite:///{db}", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def as_sent(stored: Entries) -> Entries:
    return [{k: v for k, v in e.items() if k not in ("gate", "headend")} for e in stored]


def test_forged_copies_published_first_after_an_outage_take_nothing(
        gates: Callable[..., SignedGate], stubs: Callable[..., GateStub],
        run_headend: Callable[..., Headend], keyfiles: Callable[..., tuple[str, ...]]) -> None:
    gate = gates(taps=9)
    entries = gate.entries()
    todo = batches(entries, 4)
    real = stubs(gate.gate)
    for batch_id, chunk in todo:  # the head-end is away: nobody stores these
        real.publish(batch_id, chunk)
    attacker = stubs(gate.gate)  # it copied them off the topic
    h = run_headend(*keyfiles(gate))
    forged = {batch_id: forge(chunk) for batch_id, chunk in todo}
    for batch_id, chunk in forged.items():
        ack = attacker.sync([(batch_id, chunk)])[batch_id]
        # the gate sees this ack too (its ack topic, its batch id): it must name nothing
        assert ack.stored == []
        assert set(ack.problems) == set(uuids_of(chunk))
        assert all(why.startswith("not the gate's: ") for why in ack.problems.values())
        assert real.wait_for_ack(batch_id, 10) == ack  # the gate hears it too
    assert rows(h.db) == []
    for batch_id, chunk in todo:  # the gate resends: all of it stored as it sent it
        assert real.sync([(batch_id, chunk)])[batch_id].stored == uuids_of(chunk)
    assert as_sent(exported(h.db)) == entries
    assert {r["why"].split(":")[0] for r in exported(h.db, "--rejected")} == {
        "not the gate's"}
    h.stop()


def test_forged_copies_stored_before_the_gate_s_key_was_known_are_displaced(
        gates: Callable[..., SignedGate], stubs: Callable[..., GateStub],
        run_headend: Callable[..., Headend], keyfiles: Callable[..., tuple[str, ...]]) -> None:
    """Without the gate's key the head-end cannot tell the copies apart: the first keeps
    the uuid, and the gate's own is kept aside and named in no ack (so the gate keeps it
    and sends it again). Once the key is given, that resend takes the uuids back."""
    gate = gates(taps=9)
    entries = gate.entries()
    todo = batches(entries, 4)
    h = run_headend()  # no gate keys yet
    attacker, real = stubs(gate.gate), stubs(gate.gate)
    attacker.sync([(b, forge(chunk)) for b, chunk in todo[1:]])
    for batch_id, _ in todo[1:]:  # the gate hears those acks too: before its own count
        assert real.wait_for_ack(batch_id, 10) is not None
    acks = real.sync(todo)
    assert acks[todo[0][0]].stored == uuids_of(todo[0][1])
    for batch_id, chunk in todo[1:]:
        assert acks[batch_id].stored == [], "an ack named a uuid stored with other content"
        assert set(acks[batch_id].problems) == set(uuids_of(chunk))
        assert all("neither copy can be proven" in why
                   for why in acks[batch_id].problems.values())
    h.stop()

    h = run_headend(*keyfiles(gate), name="h2")  # the same database, the gate's key given
    again = real.sync(todo)
    assert all(again[b].stored == uuids_of(chunk) for b, chunk in todo)
    assert all(again[b].problems == {} for b, _ in todo)
    stored = exported(h.db)
    assert as_sent(stored) == entries
    first = set(uuids_of(todo[0][1]))  # checked with no key: "no key", not a flag
    assert {(e["headend"]["hash"], e["headend"]["sig"], e["headend"]["chain"])
            for e in stored if e["uuid"] not in first} == {("ok", "ok", "linked")}
    assert all(e["headend"]["problems"] == [] for e in stored)
    displaced = [r for r in exported(h.db, "--rejected") if r["why"].startswith("displaced")]
    assert sorted(r["uuid"] for r in displaced) == sorted(
        u for _, chunk in todo[1:] for u in uuids_of(chunk))
    (state,) = rows(h.db, "SELECT * FROM gate")
    assert (state["entries"], state["head_id"], state["contiguous_through"], state["pending"],
            state["broken"]) == (len(entries), len(entries), len(entries), 0, 0)
    h.stop()


def test_another_gate_s_copies_give_way_to_the_gate_s_own(tmp_path: Path) -> None:
    """In process: gate B (no key known) files gate A's entries, altered or not, under
    its own topic first; A's own copies, proven by A's key, take their uuids back, and
    both gates' counts and chains come out as if B had sent nothing."""
    from headend.store import Store

    a = SignedGate(tmp_path / "a", bytes.fromhex("000000A00001"))
    try:
        a.ride(6)
        entries = a.entries()
    finally:
        a.close()
    verifier = Verifier(tac_master_key=MASTER_TAC_KEY, gate_keys={a.gate: [a.key.public_key()]})
    b = "000000B00002"
    with Store(f"sqlite:///{tmp_path}/h.db") as store:
        copies = entries[:3] + forge(entries[3:])
        done = store.store_batch(gate=b, batch_id="b", entries=copies, verifier=verifier,
                                 stored_by="t", after_ack=True)
        assert done.stored == uuids_of(copies)
        # A's middle first: its successor links to A's own copy, not the forged one
        done = store.store_batch(gate=a.gate, batch_id="a2", entries=entries[2:],
                                 verifier=verifier, stored_by="t", after_ack=True)
        assert (done.stored, done.problems) == (uuids_of(entries[2:]), {})
        done = store.store_batch(gate=a.gate, batch_id="a1", entries=entries[:2],
                                 verifier=verifier, stored_by="t", after_ack=True)
        assert (done.stored, done.problems) == (uuids_of(entries[:2]), {})
        assert as_sent(list(store.export())) == entries
        assert {line["gate"] for line in store.export()} == {a.gate}
        assert {line["headend"]["chain"] for line in store.export()} == {"linked"}
        counts = {g["gate"]: (g["entries"], g["head_id"], g["contiguous_through"],
                              g["pending"], g["broken"]) for g in store.gates()}
        assert counts == {a.gate: (len(entries),) * 3 + (0, 0), b: (0, 0, 0, 0, 0)}
        assert len(list(store.export_rejected())) == len(entries)
