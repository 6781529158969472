"""The head-end's store: every gate's entries, once each, with the verdicts on them.

peewee over SQLite (``sqlite:///path``, WAL, synchronous=FULL, BEGIN IMMEDIATE) or
PostgreSQL (``postgresql://...``, through playhouse.db_url). One batch is one transaction:

1. the gate's row is upserted first. On PostgreSQL that row lock serialises the batches of
   one gate across head-end instances, so the chain check of one never misses the entries
   another is committing; SQLite's BEGIN IMMEDIATE serialises all writers anyway;
2. entries whose uuid is already stored with the same content under the same gate are
   duplicates (a resend): acknowledged again, never stored twice. The insert itself is
   INSERT ... ON CONFLICT (uuid) DO NOTHING, and a count that falls short (another
   instance stored one of them meanwhile) retries the batch, which then sees them as
   duplicates;
3. each new entry's chain link is checked when its predecessor (same gate, id - 1) is
   stored, in this batch or before; otherwise it stays ``pending`` and the batch that
   brings the predecessor settles it: entries may arrive in any order across batches;
4. nothing is dropped: an entry without a uuid, or that cannot be stored as one, goes to
   the ``rejected`` table with the reason (once, however often it is resent).

An ack names only entries stored with the content the gate sent, under that gate: a
forged copy must never take a gate's entry from it, nor make the gate prune it. So an
entry of a gate whose device key the head-end has is checked before it is stored; one
the key disproves (hash or signature) takes no uuid and is kept aside, unacknowledged. A
uuid already held by another content, or another gate, is the stored copy's, unless the
gate's key proves the new copy and the stored copy's gate's key does not: then the
stored copy (a forgery that came first, e.g. while the gate had no key here) is moved
aside and the gate's own takes its place. Without the gate's key neither can be proven:
the first copy keeps the uuid and the other is kept aside, unacknowledged (the gate
keeps it and sends it again; once its key is given, that resend settles the matter).

The caller acknowledges the batch only after :meth:`Store.store_batch` returned, i.e.
after the commit. Each entry's hash, signature and TAC are checked before that commit
when a verifier is given; the consumer checks so only the entries of gates with a key,
and stores the rest ``pending`` (an Ed25519 check costs more than storing the entry):
:meth:`Store.record_verdicts` writes them later, from the verifying processes of
:mod:`headend.verdicts`. A partial index holds exactly the entries still pending, so
finding them costs what is pending, not the table; ``gates`` counts them per gate.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import peewee
from playhouse import db_url

from headend import schema, verify
from headend.verify import PENDING_VERDICT, Parsed, Verdict, Verifier
from protocol.errors import ConfigError, TapgateError

log = logging.getLogger("tapgate.headend.store")

SCHEMA_VERSION = 1
CHUNK = 500  # rows or parameters per statement, far below every database's limit
BATCH_ID = 128  # the batch column's width: a longer batch id is kept cut, in the rows only
RETRIES = 8
TWICE = "the uuid twice in one batch, with other content (kept aside)"


class StoreError(TapgateError):
    """The head-end's database cannot be opened, read or written."""


def open_database(url: str) -> peewee.Database:
    """``sqlite:///relative/path``, ``sqlite:////absolute/path`` or a PostgreSQL URL."""
    parsed = urlparse(url)
    try:
        if parsed.scheme == "sqlite":
            path = db_url.parse(url)["database"]  # type: ignore[no-untyped-call]
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            # FULL: a batch is acknowledged after its commit, and the gate may then prune
            # it; a commit that a power cut can still undo would lose it for good.
            db: peewee.Database = db_url.connect(  # type: ignore[no-untyped-call]
                url, lock_type="IMMEDIATE", timeout=60,
                pragmas={"journal_mode": "wal", "synchronous": 2, "busy_timeout": 60000})
        else:
            db = db_url.connect(url)  # type: ignore[no-untyped-call]
    except (RuntimeError, ValueError, peewee.ImproperlyConfigured, OSError) as err:
        raise ConfigError("--db", url, str(err)) from err
    return db


@dataclass
class Stored:
    """What one batch did, for its ack."""

    stored: list[str] = field(default_factory=list)  # uuids held now: new and known
    problems: dict[str, str] = field(default_factory=dict)  # uuid -> why it is suspect
    new: int = 0
    duplicates: int = 0
    rejected: int = 0


class _Raced(Exception):
    """Another instance stored one of this batch's uuids between our read and insert."""


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _flag(reasons: Sequence[str]) -> str | None:
    return "; ".join(reasons) or None


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.db = open_database(url)
        self._entry, self._gate, self._rejected, self._meta = schema.tables(self.db)

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> Store:
        try:
            self.db.connect(reuse_if_open=True)
            with self.db.atomic():
                self.db.create_tables([self._entry, self._gate, self._rejected, self._meta],
                                      safe=True)
                self._execute(schema.UNVERIFIED_INDEX, ())
                self._execute(schema.REJECTED_INDEX, ())
                row = self._meta.get_or_none(self._meta.key == "schema_version")
                if row is None:
                    self._meta.create(key="schema_version", value=str(SCHEMA_VERSION))
                elif int(row.value) > SCHEMA_VERSION:
                    raise StoreError(f"{self.url} has head-end schema {row.value}; this "
                                     f"head-end knows up to {SCHEMA_VERSION}")
        except peewee.PeeweeException as err:
            self.db.close()
            raise StoreError(f"cannot open the head-end database {self.url}: {err}") from err
        return self

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()

    def __enter__(self) -> Store:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------
    def _execute(self, sql: str, params: Sequence[Any]) -> Any:
        return self.db.execute_sql(  # type: ignore[no-untyped-call]
            sql.replace("?", self.db.param), params)

    def _sql(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        cursor = self._execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []

    def store_batch(self, *, gate: str, batch_id: str, entries: Iterable[object],
                    verifier: Verifier | None, stored_by: str, notes: Sequence[str] = (),
                    received_ms: int | None = None, after_ack: bool = False) -> Stored:
        """Store one batch in one transaction; return once it is committed.

        ``verifier``: check each new entry's hash, signature and TAC first, and settle a
        uuid two copies claim (:meth:`_contest`); ``after_ack`` (the consumer's way): check
        first only the entries of gates whose key the verifier has (an ack must name only
        what the gate itself sent), store the rest ``pending`` for :meth:`record_verdicts`.
        None: store every new entry ``pending``. The chain link is checked here either
        way. ``notes``: problems of the whole batch (e.g. it names another gate than its
        topic), recorded on each of its entries.
        """
        now = received_ms if received_ms is not None else int(time.time() * 1000)
        batch_id = verify.printable(batch_id)[:BATCH_ID]
        notes = [verify.printable(n) for n in notes]
        parsed: list[Parsed] = []
        malformed: list[tuple[object, str]] = []
        for obj in entries:
            p = verify.parse_entry(obj)
            if isinstance(p, str):
                malformed.append((obj, p))
            else:
                parsed.append(p)
        checking = verifier if verifier is not None and (
            not after_ack or verifier.has_key(gate)) else None
        # Checked before the transaction, so that instances sharing the database do not
        # verify signatures one at a time under its lock; entries already stored (a
        # resend) are not checked again. One that another instance stores meanwhile is
        # simply a duplicate; one that arrives here unchecked is checked in the transaction.
        verdicts: dict[str, Verdict] = {}  # by content: a uuid may come with two
        if checking is not None:
            try:
                held = {u: (g, t) for u, (_, g, t, _) in
                        self._known([p.uuid for p in parsed]).items()}
            except peewee.PeeweeException:
                held = {}
            verdicts = {p.text: checking.verify(gate, p) for p in parsed
                        if held.get(p.uuid) != (gate, p.text)}
        for attempt in range(RETRIES):
            try:
                with self.db.atomic():
                    return self._store(gate, batch_id, parsed, malformed, dict(verdicts),
                                       checking, verifier, notes, now, stored_by)
            except _Raced:
                log.info("batch %s of %s raced another head-end; again", batch_id, gate)
            except peewee.OperationalError as err:  # locked past the busy timeout, link lost
                if attempt == RETRIES - 1:
                    raise StoreError(f"cannot store batch {batch_id} of {gate}: {err}") from err
                log.warning("batch %s of %s: %s; again", batch_id, gate, err)
                self.db.close()
                time.sleep(min(0.05 * 2 ** attempt, 2.0))
            except peewee.PeeweeException as err:
                raise StoreError(f"cannot store batch {batch_id} of {gate}: {err}") from err
        raise StoreError(f"batch {batch_id} of {gate} raced other head-ends {RETRIES} times")

    def _store(self, gate: str, batch_id: str, parsed: list[Parsed],
               malformed: list[tuple[object, str]], verdicts: dict[str, Verdict],
               checking: Verifier | None, keys: Verifier | None, notes: list[str], now: int,
               stored_by: str) -> Stored:
        self._sql(schema.LOCK_GATE, (gate, now, now))
        result = Stored()
        rejects: list[dict[str, Any]] = []

        def reject(uuid: str | None, payload: object, why: str, of: str = gate) -> None:
            text = (verify.printable(payload) if isinstance(payload, str)
                    else json.dumps(payload, sort_keys=True))
            rejects.append(dict(gate=of, batch=batch_id, uuid=uuid, payload=text,
                                why=verify.printable(why), received_ms=now,
                                stored_by=stored_by))

        def verdict(p: Parsed) -> Verdict:
            if p.text not in verdicts:
                verdicts[p.text] = (checking.verify(gate, p) if checking is not None
                                    else PENDING_VERDICT)
            return verdicts[p.text]

        for obj, reason in malformed:
            reject(None, obj, reason)
        known = self._known([p.uuid for p in parsed])
        new: list[Parsed] = []
        displaced: list[tuple[str, int | None]] = []  # (gate, entry id) of rows moved aside
        twice: dict[str, list[str]] = defaultdict(list)  # uuid -> notes for the copy kept
        for uuid, copies in _copies(parsed).items():
            p = copies[0]
            if len(copies) > 1:
                # one uuid with other content twice in a batch: the copy the gate's key
                # proves (the first when none or both are), the others kept aside
                p = next((c for c in copies if verify.proven(verdict(c))), p)
                for other in copies:
                    if other is not p:
                        reject(uuid, other.fields, TWICE)
                twice[uuid].append(TWICE)
            held = known.get(uuid)
            if held is not None and held[1:3] == (gate, p.text):
                result.stored.append(uuid)
                result.duplicates += 1
                if held[3] or twice[uuid]:
                    result.problems[uuid] = "; ".join(filter(None, [held[3], *twice[uuid]]))
                continue
            why = verify.disproof(verdict(p)) if checking is not None else None
            if why is not None:  # a copy the gate's key disproves takes no uuid
                reject(uuid, p.fields, why + " (kept aside)")
                result.problems[uuid] = why
                continue
            if held is not None:
                why = self._contest(held, gate, keys)
                if why is not None:
                    reject(uuid, p.fields, why)
                    result.problems[uuid] = why
                    continue
                reject(uuid, held[2], f"displaced by {gate}'s own signed copy: not the "
                       "gate's (kept aside)", of=held[1])
                displaced.append(self._delete(held[0]))
            new.append(p)
            result.stored.append(uuid)
            if twice[uuid]:
                result.problems[uuid] = "; ".join(twice[uuid])
        result.rejected = self._keep_rejects(rejects)
        if new:
            self._insert_new(gate, batch_id, new, {p.uuid: verdict(p) for p in new}, notes,
                             twice, now, stored_by, result)
        for of, entry_id in displaced:
            self._relink(of, entry_id)
        return result

    @staticmethod
    def _contest(held: tuple[int, str, str, str | None], gate: str,
                 keys: Verifier | None) -> str | None:
        """A copy of a uuid already stored with other content, or under another gate, that
        the gate's key proves (:func:`verify.disproof` came first): None when it displaces
        the stored copy, which the key of the gate it is stored under does not prove (a
        forged copy that came first, undone), else why it is kept aside, unacknowledged:
        an ack names only what is stored as the gate sent it."""
        if keys is None or not keys.has_key(gate):
            return ("the uuid is already stored with other content; without the gate's "
                    "key neither copy can be proven the gate's (kept aside)")
        if not verify.proven(keys.verify_fields(held[1], json.loads(held[2]))):
            return None
        return "the uuid is already stored with other content (kept aside)"

    def _delete(self, row_id: int) -> tuple[str, int | None]:
        """Move a displaced copy out of the gate's counts; its successor is linked again
        once the batch's entries are in (:meth:`_relink`)."""
        ((gate, entry_id, chain),) = self._sql(schema.ROW, (row_id,))
        self._sql(schema.DELETE, (row_id,))
        ((head,),) = self._sql(schema.HEAD, (gate,))
        below = entry_id - 1 if entry_id is not None else 1 << 62
        self._sql(schema.UNCOUNT, (int(chain == verify.CHAIN_PENDING),
                             int(chain == verify.CHAIN_BROKEN), head or 0, below, below, gate))
        return gate, entry_id

    def _relink(self, gate: str, entry_id: int | None) -> None:
        """The successor of a displaced entry: its link checked again against what holds
        that id now (the gate's own copy, or none: it waits)."""
        if entry_id is None:
            return
        hashes = [h for (_, h) in self._sql(schema.HASHES + schema.params([entry_id]),
                                            (gate, entry_id))]
        delta = {verify.CHAIN_PENDING: 0, verify.CHAIN_BROKEN: 0}
        for row_id, prev_hash, old, h, s, t, notes in self._sql(schema.NEXT, (gate, entry_id + 1)):
            chain = (verify.CHAIN_PENDING if not hashes else verify.CHAIN_LINKED
                     if prev_hash in hashes else verify.CHAIN_BROKEN)
            reasons = verify.problems(h, s, t, chain, json.loads(notes) if notes else [])
            self._sql(schema.SETTLE, (chain, _flag(reasons), row_id))
            for state, sign in ((old, -1), (chain, 1)):
                if state in delta:
                    delta[state] += sign
        ((through,),) = self._sql(schema.THROUGH, (gate,))
        self._sql(schema.RECOUNT, (delta[verify.CHAIN_PENDING], delta[verify.CHAIN_BROKEN],
                             self._contiguous(gate, through), gate))

    def _keep_rejects(self, rejects: list[dict[str, Any]]) -> int:
        """Insert what was kept aside, but not again what a resend brings again (a gate
        resends an entry no ack named until one does)."""
        seen: set[tuple[str, str, str]] = set()
        uuids = sorted({r["uuid"] for r in rejects if r["uuid"] is not None})
        for chunk in _chunks(uuids):
            seen.update(self._sql(schema.REJECTED + schema.params(chunk), chunk))
        fresh = []
        for r in rejects:
            key = (r["gate"], r["uuid"], r["payload"])
            if r["uuid"] is None or key not in seen:
                seen.add(key)
                fresh.append(r)
        for chunk in _chunks(fresh, CHUNK // 8):
            self._rejected.insert_many(chunk).execute()
        return len(rejects)

    def _insert_new(self, gate: str, batch_id: str, new: list[Parsed],
                    verdicts: dict[str, Verdict], notes: list[str],
                    notes_of: dict[str, list[str]], now: int, stored_by: str,
                    result: Stored) -> None:
        # Candidates for each id: this batch's new entries and those stored before.
        hashes: dict[int, list[str | None]] = defaultdict(list)
        stored_ids: set[int] = set()
        for p in new:
            if p.entry_id is not None:
                hashes[p.entry_id].append(p.hash)
        wanted = sorted({i for p in new if p.entry_id is not None
                         for i in (p.entry_id, p.entry_id - 1)})
        for chunk in _chunks(wanted):
            for entry_id, digest in self._sql(schema.HASHES + schema.params(chunk), (gate, *chunk)):
                hashes[entry_id].append(digest)
                stored_ids.add(entry_id)
        rows: list[dict[str, Any]] = []
        pending = broken = 0
        for p in new:
            chain = _link(p, hashes)
            pending += chain == verify.CHAIN_PENDING
            broken += chain == verify.CHAIN_BROKEN
            v = verdicts[p.uuid]
            extra = [*notes, *notes_of.get(p.uuid, ())]
            if p.entry_id is not None and (p.entry_id in stored_ids
                                           or len(hashes[p.entry_id]) > 1):
                extra.append(f"another entry of this gate has id {p.entry_id}")
            extra += v.notes  # the verdicts' notes last, as record_verdicts adds them
            reasons = verify.problems(v.hash, v.sig, v.tac, chain, extra)
            if reasons:
                result.problems[p.uuid] = "; ".join(reasons)
            rows.append(dict(
                gate=gate, uuid=p.uuid, entry_id=p.entry_id, kind=p.kind, state=p.state,
                prev_hash=p.prev_hash, hash=p.hash, created_ms=p.created_ms,
                entry_json=p.text, batch=batch_id, received_ms=now, stored_by=stored_by,
                hash_state=v.hash, sig_state=v.sig, tac_state=v.tac, chain_state=chain,
                notes=json.dumps(extra) if extra else None, problems=_flag(reasons)))
        inserted = 0
        for chunk in _chunks(rows, CHUNK // 2):
            inserted += self._insert_ignoring_known(chunk)
        if inserted != len(rows):
            raise _Raced()
        result.new = inserted
        resolved_pending, newly_broken = self._settle_successors(gate, new, hashes)
        ((head, through),) = self._sql(schema.GATE, (gate,))
        ids = [p.entry_id for p in new if p.entry_id is not None]
        self._sql(schema.UPDATE_GATE, (inserted, pending - resolved_pending, broken + newly_broken,
                                 max([head, *ids]), self._contiguous(gate, through), gate))

    def _known(self, uuids: list[str]) -> dict[str, tuple[int, str, str, str | None]]:
        """uuid -> (row id, gate, entry JSON, problems) of those already stored."""
        known: dict[str, tuple[int, str, str, str | None]] = {}
        for chunk in _chunks(sorted(set(uuids))):
            for row_id, uuid, g, text, problems in self._sql(
                    schema.KNOWN + schema.params(chunk), chunk):
                known[uuid] = (int(row_id), g, text, problems)
        return known

    def _insert_ignoring_known(self, rows: Sequence[dict[str, Any]]) -> int:
        """INSERT ... ON CONFLICT (uuid) DO NOTHING, one statement for many rows; returns
        how many went in. Written out, not built by peewee: building a 500-row insert
        costs more than SQLite's own work on it."""
        columns = list(rows[0])
        names = ", ".join(f'"{c}"' for c in columns)
        values = ", ".join([schema.params(columns)] * len(rows))
        sql = f'INSERT INTO "entry" ({names}) VALUES {values} ON CONFLICT ("uuid") DO NOTHING'
        params = [row[c] for row in rows for c in columns]
        return int(self._execute(sql, params).rowcount)

    def _settle_successors(self, gate: str, new: list[Parsed],
                           hashes: dict[int, list[str | None]]) -> tuple[int, int]:
        """Entries stored before that waited for one of ``new``: link them now."""
        after = sorted({p.entry_id + 1 for p in new if p.entry_id is not None})
        settled = broken = 0
        for chunk in _chunks(after):
            waiting = self._sql(schema.WAITING + schema.params(chunk),
                                (gate, verify.CHAIN_PENDING, *chunk))
            for row_id, entry_id, prev_hash, h, s, t, notes in waiting:
                chain = (verify.CHAIN_LINKED if prev_hash in hashes[entry_id - 1]
                         else verify.CHAIN_BROKEN)
                reasons = verify.problems(h, s, t, chain, json.loads(notes) if notes else [])
                self._sql(schema.SETTLE, (chain, _flag(reasons), row_id))
                settled += 1
                broken += chain == verify.CHAIN_BROKEN
        return settled, broken

    def _contiguous(self, gate: str, through: int) -> int:
        """The highest n such that the gate's ids 1..n are all stored."""
        while True:
            ids = [i for (i,) in self._sql(schema.AFTER, (gate, through, CHUNK))]
            for entry_id in ids:
                if entry_id != through + 1:
                    return through
                through = entry_id
            if len(ids) < CHUNK:
                return through

    # -- verdicts after the ack -----------------------------------------------------------
    def unverified(self, limit: int, *, part: int = 0, parts: int = 1) -> list[
            tuple[int, str, str]]:
        """Up to ``limit`` entries whose hash, signature and TAC are still ``pending``,
        oldest first, as (row id, gate, entry JSON); those whose row id is ``part``
        modulo ``parts`` (several verifying processes share the work that way)."""
        try:
            return [(int(i), str(g), str(t)) for i, g, t in self._sql(
                schema.UNVERIFIED, (parts, parts, part, limit))]
        except peewee.PeeweeException as err:
            raise StoreError(f"cannot read {self.url}: {err}") from err

    def record_verdicts(self, verdicts: dict[int, tuple[str, Verdict]]) -> int:
        """Write the verdicts of entries stored ``pending`` (row id -> (gate, verdict)) and
        their flag, from the chain verdict and notes they have now: one transaction, a
        gate at a time under the same lock its batches take, so that a batch settling
        an entry's chain meanwhile and these verdicts do not overwrite each other's
        flag. An entry no longer pending (another process was first) is left alone.
        Returns how many were written."""
        by_gate: dict[str, dict[int, Verdict]] = defaultdict(dict)
        for row_id, (gate, verdict) in verdicts.items():
            by_gate[gate][row_id] = verdict
        for attempt in range(RETRIES):
            try:
                with self.db.atomic():
                    return sum(self._record(gate, by_gate[gate]) for gate in sorted(by_gate))
            except peewee.OperationalError as err:  # locked past the busy timeout, link lost
                if attempt == RETRIES - 1:
                    raise StoreError(f"cannot record verdicts: {err}") from err
                log.warning("recording verdicts: %s; again", err)
                self.db.close()
                time.sleep(min(0.05 * 2 ** attempt, 2.0))
            except peewee.PeeweeException as err:
                raise StoreError(f"cannot record verdicts: {err}") from err
        raise AssertionError("unreachable")

    def _record(self, gate: str, verdicts: dict[int, Verdict]) -> int:
        self._sql(schema.HOLD_GATE, (gate,))
        updates: list[tuple[Any, ...]] = []
        for chunk in _chunks(sorted(verdicts)):
            for row_id, chain, notes in self._sql(
                    schema.STILL_PENDING + schema.params(chunk), chunk):
                v = verdicts[row_id]
                extra = [*(json.loads(notes) if notes else []), *v.notes]
                reasons = verify.problems(v.hash, v.sig, v.tac, chain, extra)
                updates.append((v.hash, v.sig, v.tac, json.dumps(extra) if extra else None,
                                _flag(reasons), row_id))
        if updates:
            cursor = self.db.cursor()  # type: ignore[no-untyped-call]
            cursor.executemany(schema.VERDICTS.replace("?", self.db.param), updates)
        return len(updates)

    def reject_payload(self, *, gate: str, payload: bytes, why: str, stored_by: str) -> None:
        """Keep a message that is not a batch at all, with why."""
        text = verify.printable(payload.decode("utf-8", errors="backslashreplace"))
        try:
            with self.db.atomic():
                self._rejected.create(gate=gate, batch="", uuid=None, payload=text,
                                      why=verify.printable(why),
                                      received_ms=int(time.time() * 1000), stored_by=stored_by)
        except peewee.PeeweeException as err:
            raise StoreError(f"cannot keep a rejected message of {gate}: {err}") from err

    # -- reading -----------------------------------------------------------------------
    def export(self, gate: str | None = None) -> Iterator[dict[str, Any]]:
        """The stored entries in (gate, id) order: gate, then the entry's fields exactly
        as the gate exported them, then the head-end's verdicts under ``headend``."""
        E = self._entry
        query = E.select()
        if gate is not None:
            query = query.where(E.gate == gate)
        query = query.order_by(E.gate, E.entry_id.asc(nulls="LAST"), E.uuid)
        try:
            for row in query.iterator():
                yield {"gate": row.gate, "uuid": row.uuid, **json.loads(row.entry_json),
                       "headend": {
                           "batch": row.batch, "received_ms": row.received_ms,
                           "stored_by": row.stored_by, "hash": row.hash_state,
                           "sig": row.sig_state, "tac": row.tac_state,
                           "chain": row.chain_state,
                           "problems": verify.problems(
                               row.hash_state, row.sig_state, row.tac_state, row.chain_state,
                               json.loads(row.notes) if row.notes else [])}}
        except peewee.PeeweeException as err:
            raise StoreError(f"cannot read {self.url}: {err}") from err

    def export_rejected(self) -> Iterator[dict[str, Any]]:
        R = self._rejected
        try:
            for row in R.select().order_by(R.id).iterator():
                yield {"gate": row.gate, "batch": row.batch, "uuid": row.uuid,
                       "payload": row.payload, "why": row.why, "received_ms": row.received_ms,
                       "stored_by": row.stored_by}
        except peewee.PeeweeException as err:
            raise StoreError(f"cannot read {self.url}: {err}") from err

    def gates(self) -> list[dict[str, Any]]:
        """The chain state of every gate, and how many of its entries await their
        verdicts (``unverified``)."""
        G = self._gate
        try:
            waiting = {str(g): int(n) for g, n in self._sql(schema.UNVERIFIED_PER_GATE, ())}
            return [{**row, "unverified": waiting.get(row["gate"], 0)}
                    for row in G.select().order_by(G.gate).dicts()]
        except peewee.PeeweeException as err:
            raise StoreError(f"cannot read {self.url}: {err}") from err


def _copies(parsed: list[Parsed]) -> dict[str, list[Parsed]]:
    """uuid -> its copies in the batch, in order, each content once."""
    copies: dict[str, list[Parsed]] = {}
    for p in parsed:
        held = copies.setdefault(p.uuid, [])
        if all(c.text != p.text for c in held):
            held.append(p)
    return copies


def _link(p: Parsed, hashes: dict[int, list[str | None]]) -> str:
    if p.entry_id is None or p.prev_hash is None:
        return verify.CHAIN_UNPLACED
    if p.entry_id == 1:
        return verify.CHAIN_LINKED if p.prev_hash == verify.GENESIS_HEX else verify.CHAIN_BROKEN
    candidates = hashes.get(p.entry_id - 1)
    if not candidates:
        return verify.CHAIN_PENDING
    return verify.CHAIN_LINKED if p.prev_hash in candidates else verify.CHAIN_BROKEN
