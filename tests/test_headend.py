"""The reference head-end against a real mosquitto: `tapgate-headend run` as a separate
process, fed by gates on the simulator whose journals sign their entries
(tests/gate_stub.py), then read back from its database and with `export`.

Two head-ends in one test share one SQLite database (WAL, busy timeout, BEGIN
IMMEDIATE), as instances of a real deployment share one PostgreSQL: a gate's batches are
split between the instances of the shared subscription, and its chain can only be
checked, and its entries deduped, where all of them are.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from daemon.journal.entry import ENTRY_FIELDS, chain_hash
from daemon.sync import contract
from headend import keys, verify
from headend.verify import Verifier, parse_entry
from tests.fixtures.mosquitto import Mosquitto
from tests.gate_stub import GateStub, SignedGate, batches, reseal
from tests.helpers import MASTER_TAC_KEY

ROOT = Path(__file__).resolve().parent.parent
HEADEND = [sys.executable, "-m", "headend.cli"]
READY = "ready: subscribed"


def env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TAPGATE_")}
    clean["PYTHONUNBUFFERED"] = "1"
    clean.update(extra)
    return clean


def headend(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HEADEND, *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, check=False, **kw)


class Headend:
    """One `tapgate-headend run` process."""

    def __init__(self, directory: Path, broker: Mosquitto, db: Path, *, name: str,
                 args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.db = db
        self.log_path = directory / f"{name}.log"
        self.argv = [*HEADEND, "run", "--broker", f"{broker.host}:{broker.port}",
                     "--db", f"sqlite:///{db}", "--client-id", name, *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> Headend:
        with self.log_path.open("ab") as log:
            log.write(b"--- start\n")
            self.proc = subprocess.Popen([*self.argv, *extra], cwd=ROOT, env=env(),
                                         stdout=log, stderr=subprocess.STDOUT)
        starts = self.log().count("--- start")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.log().split("--- start")[starts].count(READY):
                return self
            if self.proc.poll() is not None:
                pytest.fail(f"head-end {self.name} exited: {self.log()}", pytrace=False)
            time.sleep(0.05)
        pytest.fail(f"head-end {self.name} did not subscribe: {self.log()}", pytrace=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop it as systemd would; it must exit 0, having said so."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(20)
        assert code == 0, f"head-end {self.name} exited {code}: {self.log()}"
        assert "stopped:" in self.log()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def broker(make_broker: Callable[..., Mosquitto]) -> Mosquitto:
    """A broker of the test's own: nothing another test's gates resend can reach it."""
    return make_broker()


@pytest.fixture
def keyfiles(tmp_path: Path) -> Callable[..., tuple[str, ...]]:
    """``keyfiles(*gates)``: the run options for the TAC key and these gates' keys."""

    def make(*gates: SignedGate) -> tuple[str, ...]:
        tac = tmp_path / "tac.key"
        tac.write_text(MASTER_TAC_KEY.hex().upper() + "\n")
        tac.chmod(0o600)
        gate_keys = tmp_path / "gates.toml"
        gate_keys.write_text("".join(f'{g.gate} = "{g.public_hex}"\n' for g in gates))
        return ("--tac-key-file", str(tac), "--gate-keys", str(gate_keys))

    return make


@pytest.fixture
def run_headend(tmp_path: Path, broker: Mosquitto) -> Iterator[Callable[..., Headend]]:
    started: list[Headend] = []

    def start(*args: str, name: str = "h1", db: Path | None = None,
              first: tuple[str, ...] = ()) -> Headend:
        """Start a head-end with ``args``; ``first``: options for its first start only."""
        h = Headend(tmp_path, broker, db or tmp_path / "headend.db", name=name, args=args)
        started.append(h)
        return h.start(*first)

    yield start
    for h in started:
        h.kill()


@pytest.fixture
def gates(tmp_path: Path) -> Iterator[Callable[..., SignedGate]]:
    made: list[SignedGate] = []

    def make(terminal_id: str = "000000A00001", taps: int = 20) -> SignedGate:
        gate = SignedGate(tmp_path / f"gate-{terminal_id}", bytes.fromhex(terminal_id))
        gate.ride(taps)
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.close()


@pytest.fixture
def stubs(broker: Mosquitto) -> Iterator[Callable[..., GateStub]]:
    made: list[GateStub] = []

    def make(gate: str, **kw: Any) -> GateStub:
        stub = GateStub(broker.host, broker.port, gate, **kw)
        made.append(stub)
        return stub

    yield make
    for stub in made:
        stub.close()


def rows(db: Path, sql: str = "SELECT * FROM entry ORDER BY gate, entry_id") -> list[
        dict[str, Any]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def verified_rows(db: Path, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The stored entries once none awaits its hash, signature and TAC verdicts: the
    verifying processes check them after the ack."""
    deadline = time.monotonic() + timeout
    while True:
        stored = rows(db)
        if all(r["hash_state"] != "pending" for r in stored):
            return stored
        assert time.monotonic() < deadline, "verdicts still pending"
        time.sleep(0.05)


def export(db: Path, *args: str) -> list[dict[str, Any]]:
    done = headend("export", "--db", f"sqlite:///{db}", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def uuids_of(entries: list[dict[str, Any]]) -> list[str]:
    return [str(e["uuid"]) for e in entries]


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
    # The acks name what storing found (the chain); hash, signature and TAC are checked
    # after the ack, and flagged in the database.
    problems = {u: why for a in acks.values() for u, why in a.problems.items()}
    assert set(problems) == {tampered[i_chain]["uuid"]}
    assert "prev_hash is not the hash" in problems[tampered[i_chain]["uuid"]]

    stored = {r["uuid"]: r for r in verified_rows(h.db)}
    problems = {u: r["problems"] for u, r in stored.items() if r["problems"]}
    assert set(problems) == {tampered[i]["uuid"] for i in (i_hash, i_sig, i_chain)} | {
        bad_tac["uuid"]}
    assert "hash does not match" in problems[tampered[i_hash]["uuid"]]
    assert "signature is not the gate's" in problems[tampered[i_sig]["uuid"]]
    assert "prev_hash is not the hash" in problems[tampered[i_chain]["uuid"]]
    assert "TAC is not the card's" in problems[bad_tac["uuid"]]
    assert list(stored) == uuids_of(tampered)  # flagged, none dropped
    assert stored[tampered[i_hash]["uuid"]]["hash_state"] == "mismatch"
    assert stored[tampered[i_sig]["uuid"]]["sig_state"] == "bad"
    assert stored[tampered[i_chain]["uuid"]]["chain_state"] == "broken"
    assert stored[tampered[i_chain]["uuid"]]["tac_state"] != "bad"
    bad = {u for u, r in stored.items() if r["problems"]}
    assert bad == set(problems)
    assert stored[bad_tac["uuid"]]["tac_state"] == "bad"
    # The other entries' verdicts are clean: one bad entry does not taint its neighbours.
    assert {(r["hash_state"], r["sig_state"], r["chain_state"])
            for u, r in stored.items() if u not in bad} == {("ok", "ok", "linked")}
    # A resend is acked with every problem: they are stored, not recomputed per batch.
    again = stub.sync(batches(tampered, 4))
    assert {u: w for a in again.values() for u, w in a.problems.items()} == problems
    (gate_row,) = rows(h.db, "SELECT * FROM gate")
    assert (gate_row["broken"], gate_row["pending"]) == (1, 0)
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
    # the same uuid already stored with other content: acked (so the gate stops
    # resending it), flagged, and the second content kept aside
    acks = stub.sync(batches(entries, 10))
    clash = {**entries[0], "amount": 999}
    ack = stub.sync([("clash", [clash])])["clash"]
    assert ack.stored == [clash["uuid"]] and "other content" in ack.problems[clash["uuid"]]
    assert next(iter(acks.values())).stored == uuids_of(entries)
    rejected = export(h.db, "--rejected")
    assert [r["why"] for r in rejected] == [
        "not a batch: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
        "an entry without a valid uuid", "an entry is not a JSON object",
        "the uuid is already stored with other content (kept aside)"]
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


# --- verdicts after the ack -----------------------------------------------------------------
def test_verdicts_after_storing_meet_the_chain_whichever_comes_first(tmp_path: Path) -> None:
    """In process: entries stored with their verdicts pending are flagged once checked,
    whether their verdicts or the batch that settles their chain comes first, and end
    up as they would had they been checked before the commit."""
    from headend.store import Store
    from headend.verdicts import verify_pending

    gate = SignedGate(tmp_path / "gate", bytes.fromhex("000000A00001"))
    try:
        gate.ride(12)
        entries = gate.entries()
    finally:
        gate.close()
    i_sig, half = len(entries) - 2, len(entries) // 2
    tampered = list(entries)
    tampered[i_sig] = {**entries[i_sig], "sig": Ed25519PrivateKey.generate().sign(
        bytes.fromhex(entries[i_sig]["hash"])).hex().upper()}
    verifier = Verifier(tac_master_key=MASTER_TAC_KEY,
                        gate_keys={gate.gate: [gate.key.public_key()]})
    with Store(f"sqlite:///{tmp_path}/later.db") as later:
        done = later.store_batch(gate=gate.gate, batch_id="b", entries=tampered[half:],
                                 verifier=None, stored_by="t")
        assert (done.new, done.problems) == (len(tampered) - half, {})  # nothing known yet
        assert [(g["unverified"], g["pending"]) for g in later.gates()] == [
            (len(tampered) - half, 1)]
        assert {(x["headend"]["hash"], x["headend"]["sig"], x["headend"]["tac"],
                 tuple(x["headend"]["problems"])) for x in later.export()} == {
            ("pending", "pending", "pending", ())}
        # the verdicts first: the first of these still waits for its predecessor
        assert verify_pending(later, verifier, limit=5) == 5
        assert verify_pending(later, verifier) == len(tampered) - half - 5
        assert verify_pending(later, verifier) == 0
        # then the batch that settles the chain, itself checked after
        later.store_batch(gate=gate.gate, batch_id="a", entries=tampered[:half],
                          verifier=None, stored_by="t")
        assert later.gates()[0]["unverified"] == half
        odd = verify_pending(later, verifier, part=1, parts=2)  # two processes' shares
        assert odd + verify_pending(later, verifier, part=0, parts=2) == half
        assert abs(half - 2 * odd) <= 1
        assert later.gates()[0]["unverified"] == 0 and later.gates()[0]["pending"] == 0
        # a verdict written twice (two head-ends on one database): the second finds none
        (row_id,) = next(iter(rows(tmp_path / "later.db", "SELECT id FROM entry LIMIT 1")
                              )).values()
        assert later.record_verdicts({row_id: (gate.gate, verifier.verify_fields(
            gate.gate, entries[0]))}) == 0
        after = [x["headend"] for x in later.export()]
    with Store(f"sqlite:///{tmp_path}/before.db") as before:
        for batch_id, chunk in (("b", tampered[half:]), ("a", tampered[:half])):
            before.store_batch(gate=gate.gate, batch_id=batch_id, entries=chunk,
                               verifier=verifier, stored_by="t")
        checked_first = [x["headend"] for x in before.export()]
    verdicts = ("hash", "sig", "tac", "chain", "problems")
    assert [{k: h[k] for k in verdicts} for h in after] == [
        {k: h[k] for k in verdicts} for h in checked_first]
    flagged = {tampered[i]["uuid"]: h["problems"] for i, h in enumerate(after) if h["problems"]}
    assert flagged == {tampered[i_sig]["uuid"]: ["signature is not the gate's device key's"]}
    assert {h["chain"] for h in after} == {"linked"}


def test_pending_entries_are_found_through_their_partial_index(tmp_path: Path) -> None:
    """Finding what awaits its verdicts costs what is pending, not the whole table."""
    from headend import store as module

    with module.Store(f"sqlite:///{tmp_path}/h.db") as store:
        for sql, params in ((module._UNVERIFIED, (2, 2, 1, 5)),
                            (module._UNVERIFIED_PER_GATE, ())):
            plan = str(store._sql("EXPLAIN QUERY PLAN " + sql, params))
            assert "entry_unverified" in plan, plan


def test_a_verifier_crosses_to_its_processes_with_its_keys(tmp_path: Path) -> None:
    import pickle

    gate = SignedGate(tmp_path / "gate", bytes.fromhex("000000A00001"))
    try:
        gate.ride(3)
        debit = next(e for e in gate.entries() if (e["kind"], e["state"]) == (
            "debit", "completed"))
    finally:
        gate.close()
    verifier = Verifier(tac_master_key=MASTER_TAC_KEY,
                        gate_keys={gate.gate: [gate.key.public_key()]})
    copy = pickle.loads(pickle.dumps(verifier))
    assert copy.verify_fields(gate.gate, debit) == verifier.verify_fields(
        gate.gate, debit) == verify.Verdict(hash="ok", sig="ok", tac="ok")
    assert pickle.loads(pickle.dumps(Verifier())).verify_fields(gate.gate, debit).sig == (
        "no key")


def test_what_a_stopped_headend_left_pending_is_checked_by_the_next(
        tmp_path: Path, gates: Callable[..., SignedGate],
        run_headend: Callable[..., Headend], keyfiles: Callable[..., tuple[str, ...]]) -> None:
    """Entries stored, acknowledged and not yet checked when the head-end stopped (or
    died): the next head-end on that database checks them, no batch needed."""
    from headend.store import Store

    gate = gates(taps=10)
    db = tmp_path / "headend.db"
    with Store(f"sqlite:///{db}") as store:
        store.store_batch(gate=gate.gate, batch_id="a", entries=gate.entries(), verifier=None,
                          stored_by="gone")
    assert {r["sig_state"] for r in rows(db)} == {"pending"}
    h = run_headend(*keyfiles(gate))
    stored = verified_rows(h.db)
    assert {(r["hash_state"], r["sig_state"], r["chain_state"]) for r in stored} == {
        ("ok", "ok", "linked")}
    h.stop()
    checked = re.findall(r"verifying process \d+: (\d+) entries checked", h.log())
    assert checked and sum(map(int, checked)) == len(stored)
    done = headend("gates", "--db", f"sqlite:///{db}")
    assert json.loads(done.stdout)["unverified"] == 0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_a_stop_signal_to_every_process_of_the_headend_stops_it(
        tmp_path: Path, run_headend: Callable[..., Headend]) -> None:
    """systemd stops a unit by signalling all of its processes at once: the verifying
    processes die first, and the head-end must still stop, cleanly and soon."""
    h = run_headend()
    assert h.proc is not None
    deadline = time.monotonic() + 20
    while not (kids := [c for c in children(h.proc.pid)
                        if "multiprocessing.spawn" in Path(f"/proc/{c}/cmdline").read_text()]):
        assert time.monotonic() < deadline, "no verifying process"
        time.sleep(0.05)
    time.sleep(1.5)  # up and idle: waiting for entries to check
    for pid in kids:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.2)  # they are gone before the head-end hears of it
    began = time.monotonic()
    h.stop()
    assert time.monotonic() - began < 5


def test_verifying_processes_share_the_work_and_go_with_their_headend(
        tmp_path: Path, gates: Callable[..., SignedGate]) -> None:
    """Two verifying processes check every pending entry between them; when their
    head-end dies (SIGKILL: no stop() is called), they leave too."""
    from headend.store import Store

    gate = gates(taps=20)
    db = tmp_path / "headend.db"
    with Store(f"sqlite:///{db}") as store:
        store.store_batch(gate=gate.gate, batch_id="a", entries=gate.entries(), verifier=None,
                          stored_by="t")
    script = (
        "import time\n"
        "from headend.verdicts import VerifyingProcesses\n"
        "from headend.verify import Verifier\n"
        f"v = VerifyingProcesses(url='sqlite:///{db}', verifier=Verifier(), parts=2)\n"
        "v.start()\n"
        "print(*(p.proc.pid for p in v._procs), flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids] == [
            min(19, mine + 10)] * 2  # below their head-end
        stored = verified_rows(db)
        assert {(r["hash_state"], r["sig_state"]) for r in stored} == {("ok", "no key")}
    finally:
        parent.kill()
        parent.wait(10)

    def gone(pid: int) -> bool:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True
        return "State:\tZ" in status

    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, "verifying processes outlived their head-end"
        time.sleep(0.1)


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


# --- TLS -----------------------------------------------------------------------------------
def make_pki(directory: Path, *clients: str) -> dict[str, tuple[Path, Path]]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate per name:
    name -> (certificate, key); "ca" -> (certificate, its key)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(label: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
              ) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{label}.pem", directory / f"{label}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return cert_path, key_path

    def builder(subject: str, key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject))
                .issuer_name(name("tapgate test CA")).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    out = {"ca": write("ca", builder("tapgate test CA", ca_key, True).sign(
        ca_key, hashes.SHA256()), ca_key)}
    server_key = ec.generate_private_key(ec.SECP256R1())
    out["server"] = write("server", builder("127.0.0.1", server_key, False).add_extension(
        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        critical=False).sign(ca_key, hashes.SHA256()), server_key)
    for client in clients:
        key = ec.generate_private_key(ec.SECP256R1())
        out[client] = write(client, builder(client, key, False).sign(ca_key, hashes.SHA256()),
                            key)
    return out


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
    replay, and answers on the response topic with the correlation data."""

    def __init__(self, broker: Mosquitto, gate: str,
                 operators: dict[str, Ed25519PublicKey]) -> None:
        self.gate = gate
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
        client.publish(response, reply.encode(), qos=1, properties=props)

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
                  CommandResponder(broker, "000000A00002", {info["key_id"]: public})]
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
        # the fleet: every gate answers, each on its line
        fleet = headend("command", "fleet", "sync_now", *common[:-1], "2", env=state)
        assert fleet.returncode == 0, fleet.stderr
        answers = [json.loads(x) for x in fleet.stdout.splitlines()]
        assert sorted(a["gate"] for a in answers) == [gate, "000000A00002"]
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


def test_tac_check_on_the_purse_test_vector() -> None:
    """PURSE.md's vector: the head-end recomputes its TAC from the exported fields."""
    fields = {"id": 1, "uuid": "u1", "kind": "debit", "state": "completed",
              "card_serial": "8801000000001234", "card_random": "A1B2C3D4", "card_counter": 7,
              "terminal_seq": 0x2A, "amount": 250, "terminal_id": "000000A00001",
              "tx_date": "20261122", "tx_time": "083015", "tac": "4F40885B",
              "prev_hash": "00" * 32}
    fields["hash"] = chain_hash(fields).hex().upper()
    parsed = parse_entry(fields)
    assert not isinstance(parsed, str)
    verifier = Verifier(tac_master_key=MASTER_TAC_KEY)
    assert verifier.verify("g", parsed).tac == "ok"
    wrong = parse_entry({**fields, "tac": "4F40885C"})
    assert not isinstance(wrong, str) and verifier.verify("g", wrong).tac == "bad"
    partial = parse_entry({**fields, "card_random": None})
    assert not isinstance(partial, str)
    assert verifier.verify("g", partial).tac == "incomplete"
    assert Verifier().verify("g", parsed).tac == "unchecked"
