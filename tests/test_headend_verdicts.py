"""The head-end's verdicts after the ack: hash, signature and TAC are checked by
verifying processes once the entries are stored and acknowledged, and meet the chain
whichever comes first; what a stopped head-end left unchecked is checked by the next;
the verifying processes share the work and stop with their head-end. Plus the TAC check
on PURSE.md's test vector.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from headend import verify
from headend.verify import Verifier, parse_entry
from protocol.entry import chain_hash
from tests.cards import MASTER_TAC_KEY
from tests.gate_stub import SignedGate, reseal
from tests.headend_support import ROOT, Headend, env, headend, rows, verified_rows


# --- verdicts after the ack -----------------------------------------------------------------
def test_verdicts_after_storing_meet_the_chain_whichever_comes_first(tmp_path: Path) -> None:
    """In process: entries stored with their verdicts pending are flagged once checked,
    whether their verdicts or the batch that settles their chain comes first, and end
    up as they would had they been checked before the commit."""
    from headend.store import Store
    from headend.verdicts import verify_pending

    gate = SignedGate(tmp_path / "gate", bytes.fromhex("000000A00001"))
    try:
        gate.ride(11)
        # the gate's own, signed and chained, its TAC not the card's: stored and flagged
        # (a copy the gate's key disproves is not stored at all: test_headend.py)
        bad_tac = gate.append_debit_with_tac(bytes(4))
        gate.ride(1)
        entries = gate.entries()
    finally:
        gate.close()
    i_tac, half = [e["uuid"] for e in entries].index(bad_tac["uuid"]), len(entries) // 2
    assert i_tac > half
    tampered = list(entries)
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
    assert flagged == {tampered[i_tac]["uuid"]: ["TAC is not the card's: the card did not "
                                                 "make this debit"]}
    assert {h["chain"] for h in after} == {"linked"}


def test_pending_entries_are_found_through_their_partial_index(tmp_path: Path) -> None:
    """Finding what awaits its verdicts costs what is pending, not the whole table."""
    from headend import schema
    from headend import store as module

    with module.Store(f"sqlite:///{tmp_path}/h.db") as store:
        for sql, params in ((schema.UNVERIFIED, (2, 2, 1, 5)),
                            (schema.UNVERIFIED_PER_GATE, ())):
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


def test_a_debit_of_another_terminal_filed_under_a_gate_is_flagged(tmp_path: Path) -> None:
    """A gate that re-files another terminal's debit under its own id, signed with its
    own key: hash, signature and TAC all hold (the TAC covers the other terminal's id),
    so only the terminal id gives it away."""
    here = SignedGate(tmp_path / "here", bytes.fromhex("000000A00001"))
    there = SignedGate(tmp_path / "there", bytes.fromhex("000000A00002"))
    try:
        there.ride(3)
        theirs = next(e for e in there.entries() if (e["kind"], e["state"]) == (
            "debit", "completed"))
        forged = reseal(theirs, here.key)
    finally:
        here.close()
        there.close()
    verifier = Verifier(tac_master_key=MASTER_TAC_KEY,
                        gate_keys={here.gate: [here.key.public_key()]})
    assert verifier.verify_fields(here.gate, forged) == verify.Verdict(
        hash="ok", sig="ok", tac="ok", notes=("terminal id 000000A00002 is not this gate's",))
    assert verifier.verify_fields(there.gate, theirs).notes == ()


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
