"""Every journal entry signed with the gate's Ed25519 device key; schema v1 journals
migrate to v2 and keep verifying."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon.journal import Journal, schema
from protocol import devicekey
from protocol.entry import GENESIS, INTENT, KIND_DEBIT, Entry, chain_hash
from protocol.errors import ConfigError
from tests.cards import TERMINAL_ID, serial_of
from tests.drafts import intent


def test_entries_are_signed_and_verified(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    with Journal(tmp_path / "j.db", signer=key) as journal:
        entries = [journal.append(intent(n)) for n in range(1, 6)]
        assert all(e.sig is not None and len(e.sig) == 64 for e in entries)
        report = journal.verify(key.public_key())
    assert report.ok and (report.signed, report.unsigned) == (5, 0)
    # the signature travels with the export, as hex
    assert entries[0].to_json()["sig"] == entries[0].sig.hex().upper()  # type: ignore[union-attr]


def test_another_gates_key_is_caught(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db", signer=Ed25519PrivateKey.generate()) as journal:
        journal.append(intent(1))
        report = journal.verify(Ed25519PrivateKey.generate().public_key())
    assert report.problems == ["entry 1: signature is not the device key's"]


def test_a_forged_signature_is_caught(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    with Journal(tmp_path / "j.db", signer=key) as journal:
        journal.append(intent(1))
        journal.append(intent(2))
    db = sqlite3.connect(tmp_path / "j.db")
    db.execute("UPDATE entry SET sig = ? WHERE id = 2", (bytes(64),))
    db.commit()
    db.close()
    with Journal(tmp_path / "j.db") as journal:
        assert journal.verify(key.public_key()).problems == [
            "entry 2: signature is not the device key's"]
        assert journal.verify().ok  # without the key only the chain is checked


def test_v1_journal_migrates_and_keeps_verifying(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    for statement in schema._V1:
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    # one entry written the way tapgate 0.1 (schema 1) wrote it: no sig column
    fields = Entry(id=1, uuid="a" * 32, kind=KIND_DEBIT, state=INTENT, terminal_id=TERMINAL_ID,
                   amount=250, reason=None, card_serial=serial_of(1), card_type=1,
                   balance_before=1000, balance_after=None, card_counter=0,
                   card_random=b"\1\2\3\4", terminal_seq=7, tx_date="20261122",
                   tx_time="083015", mac2=None, tac=None, ref=None, created_ms=1,
                   prev_hash=GENESIS, hash=b"")
    digest = chain_hash(fields.to_json())
    names = [n for n in fields.to_json() if n != "sig"]
    values = [getattr(fields, n) if n != "hash" else digest for n in names]
    db.execute(f"INSERT INTO entry ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
               values)
    db.commit()
    db.close()

    key = Ed25519PrivateKey.generate()
    with Journal(path, signer=key) as journal:
        assert journal.next_terminal_seq() == 8
        journal.append(intent(8))
        report = journal.verify(key.public_key())
    assert report.ok and (report.signed, report.unsigned) == (1, 1)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    db.close()


def test_keygen_writes_a_private_key_only_the_owner_reads(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "device.key"
    key = devicekey.generate(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert devicekey.public_hex(devicekey.load(path)) == devicekey.public_hex(key)
    with pytest.raises(FileExistsError):
        devicekey.generate(path)
    assert devicekey.public_hex(devicekey.generate(path, force=True)) != devicekey.public_hex(key)


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    devicekey.generate(path)
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="readable by others"):
        devicekey.load(path)


def test_a_key_that_is_not_ed25519_pem_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    path.write_text("not a key")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="not a PEM private key"):
        devicekey.load(path)
    with pytest.raises(ConfigError, match="tapgate keygen"):
        devicekey.load(tmp_path / "missing.key")
