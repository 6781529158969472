"""The entry's wire form is defined once (protocol.entry.WIRE_FORM): the JSON SQLite writes
for the uplink (daemon.journal.sql.WIRE_JSON), Entry.to_json and the batch put around
them must agree byte for byte, or the head-end recomputes other hashes than the gate's."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon.journal import Journal, sql
from protocol.contract import Batch, canonical_text
from protocol.entry import (
    COMPLETED,
    ENTRY_FIELDS,
    KIND_DEBIT,
    KIND_REFUSAL,
    REFUSED,
    WIRE_FORM,
    WIRE_HEX,
    WIRE_INT,
    WIRE_TEXT,
    Draft,
    Entry,
)

TERMINAL = bytes.fromhex("00A1B2C3D4E5F6FF")
REASONS = (None, "", "plain words, 1-2-3 (ok)", "Zürich Hbf 🚇", 'a "quoted" \\ back/slash',
           "tab\tnew\nline\x00\x1f", "del\x7f", "<script>&amp;</script>", "\u2028\u2029\ufeff",
           "é" * 50)


def _drafts() -> list[Draft]:
    drafts = [Draft(kind=KIND_REFUSAL, state=REFUSED, terminal_id=TERMINAL, reason=reason)
              for reason in REASONS]
    drafts.append(Draft(  # every field set: big and negative integers, bytes of every value
        kind=KIND_DEBIT, state=COMPLETED, terminal_id=TERMINAL, amount=2**63 - 1,
        reason="max", card_serial=bytes(range(8)), card_type=255, balance_before=-(2**63),
        balance_after=-1, card_counter=65535, card_random=b"\xff\x00\x7f\x80",
        terminal_seq=2**40, tx_date="20240229", tx_time="235959", mac2=b"\x00" * 4,
        tac=bytes(range(248, 256)), ref=1))
    drafts.append(Draft(kind=KIND_DEBIT, state=COMPLETED, terminal_id=b"", amount=0,
                        card_serial=b"", mac2=b"", tac=b""))  # empty bytes: ""
    return drafts


@pytest.fixture
def entries(tmp_path: Path) -> tuple[Journal, list[Entry]]:
    """The same entries unsigned (sig null) and then signed (a device key)."""
    path = tmp_path / "journal.db"
    with Journal(path) as journal:
        unsigned = journal.append_many(_drafts())
    journal = Journal(path, signer=Ed25519PrivateKey.generate()).open()
    signed = [journal.append(draft) for draft in _drafts()]
    return journal, unsigned + signed


def _needs_escape(text: str | None) -> bool:
    return text is not None and any(c in '"\\' or not " " <= c <= "~" for c in text)


def test_the_wire_form_is_the_entry_s_fields_in_key_order() -> None:
    assert [f.name for f in WIRE_FORM] == sorted(ENTRY_FIELDS)
    kinds = {f.name: f.kind for f in WIRE_FORM}
    assert {n for n, k in kinds.items() if k == WIRE_HEX} == {
        "terminal_id", "card_serial", "card_random", "mac2", "tac", "prev_hash", "hash", "sig"}
    assert {n for n, k in kinds.items() if k == WIRE_TEXT} == {
        "uuid", "kind", "state", "reason", "tx_date", "tx_time"}
    assert {n for n, k in kinds.items() if k == WIRE_INT} == {
        "id", "amount", "card_type", "balance_before", "balance_after", "card_counter",
        "terminal_seq", "ref", "created_ms"}


def test_sqlite_writes_each_entry_as_to_json_byte_for_byte(
        entries: tuple[Journal, list[Entry]]) -> None:
    """SQLite's JSON of an entry is canonical_text(entry.to_json()) or, only where a string
    has something to escape, is left to Python (unacked_wire), which then writes that."""
    journal, written = entries
    try:
        assert written == list(journal.entries())
        by_sqlite = 0
        for entry in written:
            expected = canonical_text(entry.to_json())
            out = journal.unacked_wire(entry.id - 1, 1)
            assert out is not None
            assert (out.ids, out.uuids, out.json) == ([entry.id], [entry.uuid], expected)
            [(text,)] = journal.db.execute(f"SELECT {sql.WIRE_JSON} FROM entry WHERE id = ?",
                                     (entry.id,)).fetchall()
            taken = text.isascii() and "\\" not in text and "\x7f" not in text
            assert taken == (not _needs_escape(entry.reason)), entry.reason
            if taken:
                assert text == expected
                by_sqlite += 1
        assert by_sqlite == 2 * (len(REASONS) + 2 - sum(map(_needs_escape, REASONS)))
        whole = journal.unacked_wire(0, 1000)
        assert whole is not None
        assert whole.json == ",".join(canonical_text(e.to_json()) for e in written)
    finally:
        journal.close()


@pytest.mark.parametrize(("gate", "batch_id"), [
    ("G1", "b-7"), ("0102030405060708", "x" * 40), ("", ""), ('"entries":[]', 'q"\\'),
    ("Zürich", "🚇\n"), ("fleet", '{"batch":"entries"}')])
def test_a_batch_wrapped_around_encoded_entries_is_the_batch_encoded(
        entries: tuple[Journal, list[Entry]], gate: str, batch_id: str) -> None:
    journal, written = entries
    journal.close()
    for docs in ([], [written[0].to_json()], [e.to_json() for e in written]):
        wrapped = Batch.wrap(gate, batch_id, ",".join(canonical_text(d) for d in docs))
        assert wrapped == Batch(gate, batch_id, docs).encode()
        assert Batch.decode(wrapped) == Batch(gate, batch_id, docs)
