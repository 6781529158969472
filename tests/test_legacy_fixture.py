"""A journal and a head-end database written before the layers were reshaped
(tests/fixtures/legacy/, made by make_legacy.py at commit 37aea90) open, verify, sync
and recover with today's code: journal bytes, wire bytes and the head-end's schema did
not change."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from daemon.journal import Journal
from daemon.outcome import Outcome
from hal.card.model import DebitRecord, VirtualPurse
from headend.store import Store
from headend.verify import Verifier
from protocol import devicekey
from protocol.contract import Batch
from protocol.entry import KIND_DEBIT, KIND_RECOVERY, NOT_DEBITED, RECOVERED, TORN
from tests.cards import MASTER_KEY, MASTER_TAC_KEY, Clock
from tests.ledger import assert_ledger, journal_problems
from tests.rig import Rig

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
STATE: dict[str, Any] = json.loads((LEGACY / "state.json").read_text())
GATE = STATE["gate"]


def _card(rig: Rig, name: str) -> VirtualPurse:
    saved = STATE["cards"][name]
    card = VirtualPurse(serial=bytes.fromhex(saved["serial"]), balance=saved["balance"],
                        master_key=MASTER_KEY, master_tac_key=MASTER_TAC_KEY,
                        counter=saved["counter"], card_type=saved["card_type"],
                        today=lambda: dt.date.fromtimestamp(rig.clock()))
    card.history = [DebitRecord(**{k: (bytes.fromhex(v) if isinstance(v, str) else v)
                                   for k, v in record.items()})
                    for record in saved["history"]]
    return card


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    copy = tmp_path / "legacy"
    shutil.copytree(LEGACY, copy)
    (copy / "device.key").chmod(0o600)
    return copy


def _store(directory: Path) -> Store:
    return Store(f"sqlite:///{directory / 'headend.db'}").open()


def test_the_legacy_journal_verifies_signed_and_keeps_its_state(legacy: Path) -> None:
    key = devicekey.load(legacy / "device.key")
    assert devicekey.public_hex(key) == STATE["device_public"]
    journal = Journal(legacy / "journal.db", signer=key).open()
    try:
        report = journal.verify(key.public_key())
        assert report.ok, report.problems
        assert report.entries == journal.count() == report.signed > 10
        assert journal.pending_sync_count() == journal.count() - len(STATE["synced_uuids"])
        assert journal.last_command_seq("00112233445566AA") == 41
        assert journal.deny_list() == (3, frozenset({bytes.fromhex("00000000000000DD")}))
        assert journal.remote_config() == {"gate.anti_passback_s": 120.0}
        assert journal.desired_version() == 2
        assert len(journal.dangling_intents()) == 1
        torn = {e.card_serial for e in journal.pending_recoveries()}
        assert torn == {bytes.fromhex(STATE["cards"][n]["serial"])
                        for n in ("torn_debited", "torn_not_debited")}
    finally:
        journal.close()


def test_the_legacy_journal_syncs_into_the_legacy_head_end_exactly_once(legacy: Path) -> None:
    key = devicekey.load(legacy / "device.key")
    verifier = Verifier(tac_master_key=MASTER_TAC_KEY, gate_keys={GATE: [key.public_key()]})
    journal = Journal(legacy / "journal.db", signer=key).open()
    try:
        rest = journal.unacked_wire(limit=1000)
        assert rest is not None
        with _store(legacy) as store:
            # the batch the old gate sent, again (its ack was lost): nothing is new
            old = Batch.decode((legacy / "batch-1.json").read_bytes())
            again = store.store_batch(gate=GATE, batch_id=old.batch_id, entries=old.entries,
                                      verifier=verifier, stored_by="test")
            assert sorted(again.stored) == sorted(STATE["synced_uuids"])
            # today's wire bytes of the rest, decoded as the head-end does
            batch = Batch.decode(Batch.wrap(GATE, "today-1", rest.json))
            assert [e["uuid"] for e in batch.entries] == rest.uuids
            stored = store.store_batch(gate=GATE, batch_id=batch.batch_id,
                                       entries=batch.entries, verifier=verifier,
                                       stored_by="test")
            assert sorted(stored.stored) == sorted(rest.uuids)
            exported = list(store.export(GATE))
            assert sorted(e["uuid"] for e in exported) == sorted(
                STATE["synced_uuids"] + rest.uuids)
            assert not list(store.export_rejected())
        assert journal.mark_acked_ids(rest.ids) == len(rest.ids)
        assert journal.pending_sync_count() == 0
    finally:
        journal.close()


def test_the_legacy_tears_are_settled_and_recovered_by_today_s_card_loop(
        legacy: Path) -> None:
    rig = Rig(legacy, clock=Clock(STATE["clock"] + 60))
    cards = {name: _card(rig, name) for name in STATE["cards"]}
    [settled] = rig.restart()  # the intent the old process died with
    assert (settled.kind, settled.state) == (KIND_DEBIT, TORN)

    assert rig.tap(cards["torn_debited"]).outcome is Outcome.RECOVERED
    assert rig.tap(cards["torn_not_debited"]).outcome is Outcome.ACCEPTED
    assert rig.tap(cards["died_before_debit"]).outcome is Outcome.ACCEPTED
    resolutions = [(e.kind, e.state) for e in rig.entries() if e.kind == KIND_RECOVERY]
    assert resolutions.count((KIND_RECOVERY, RECOVERED)) == 2  # the old one and today's
    assert resolutions.count((KIND_RECOVERY, NOT_DEBITED)) == 2
    assert_ledger(list(cards.values()), rig.journal)
    assert journal_problems(rig.journal) == []
    rig.close()
