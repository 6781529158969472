"""Checking the journal (``tapgate journal verify``): SQLite's own integrity check, the
hash chain and, given the device's public key, every entry's signature.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

import peewee
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from daemon.journal import sql
from daemon.journal.db import JournalDb, chain_anchor, stored_seq
from daemon.journal.integrity import intact
from protocol.entry import GENESIS, Entry, signed_by
from protocol.errors import JournalError


@dataclass
class VerifyReport:
    entries: int = 0
    problems: list[str] = field(default_factory=list)
    signed: int = 0  # entries whose signature the device's public key confirmed
    unsigned: int = 0  # entries written before the gate had a device key

    @property
    def ok(self) -> bool:
        return not self.problems


class Audit:
    """Checking: the journal verifies its own file, chain and signatures."""

    def __init__(self, db: JournalDb) -> None:
        self._db = db

    def verify(self, public_key: Ed25519PublicKey | None = None) -> VerifyReport:
        """Check SQLite's quick_check, the hash chain from the first entry kept and, given
        the device's public key, every entry's signature."""
        report = VerifyReport()
        try:
            rows = self._db.execute("PRAGMA quick_check").fetchall()
        except (peewee.DatabaseError, sqlite3.DatabaseError) as err:
            report.problems.append(f"quick_check failed: {err}")
            return report
        report.problems.extend(f"quick_check: {r[0]}" for r in rows if r[0] != "ok")
        prev: Entry | None = None
        try:
            stored_seq(self._db.path, self._db.meta(sql.MAX_TERMINAL_SEQ))
        except JournalError as err:
            report.problems.append(str(err))
        try:
            first_prev = chain_anchor(self._db.path, self._db.meta(sql.CHAIN_ANCHOR))
        except JournalError as err:
            report.problems.append(str(err))
            first_prev = GENESIS
        try:
            for entry in self._db.entries():
                report.entries += 1
                if prev is None and entry.prev_hash != first_prev:
                    report.problems.append(
                        f"entry {entry.id}: the first entry kept does not continue the chain "
                        "anchor: entries before it are missing")
                if not intact(entry):
                    report.problems.append(f"entry {entry.id}: hash does not match its content")
                if public_key is not None:
                    if entry.sig is None:
                        report.unsigned += 1
                    elif (isinstance(entry.sig, bytes) and isinstance(entry.hash, bytes)
                          and signed_by(public_key, entry.sig, entry.hash)):
                        report.signed += 1
                    else:
                        report.problems.append(
                            f"entry {entry.id}: signature is not the device key's")
                if prev is not None and entry.prev_hash != prev.hash:
                    report.problems.append(f"entry {entry.id}: prev_hash breaks the chain")
                if prev is not None and entry.id != prev.id + 1:
                    report.problems.append(f"entry {entry.id}: follows {prev.id}, entries missing")
                prev = entry
        except JournalError as err:
            report.problems.append(str(err))
        return report
