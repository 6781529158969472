"""The head-end's beacon directory: which gate a phone is near, from what it heard.

Each gate publishes its public info, retained, on ``tapgate/v1/<gate>/info``: its name,
station, status, page and what its beacon puts on air (iBeacon uuid/major/minor,
Eddystone-UID namespace/instance, Eddystone-URL, the EID's exponent and epoch; never the
EID identity key). The consumer hands each message to :meth:`BeaconDirectory.ingest`,
which keeps the newest per gate (by ``ts_ms``), ignores an older or repeated one, and
refuses a malformed one with the reason logged; nothing in a payload can raise out of it.

EID identity keys reach the head-end out of band (``tapgate-headend beacon register``).
An EID changes every 2**K seconds and only a holder of the key can tell whose it is:
:meth:`BeaconDirectory.resolve` computes each registered gate's EIDs around ``now``.

:meth:`BeaconDirectory.resolve` takes the advertising-data bytes a phone saw, parses
them (:func:`protocol.beacon.frames.parse`) and maps the identifier to its gate. The
tables (``beacon_info``, ``beacon_eid``) live in the head-end's database, beside the
store's. The identity keys are secrets: they are kept sealed (AES-GCM, :mod:`headend.sealed`)
with a key outside the database, needed to register a key and to resolve an EID. Rows a
head-end wrote in plain hex before (``identity_key``) are sealed when the directory is
opened with the key; until then they still resolve, and opening says so.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import peewee

from headend import sealed
from headend.gateinfo import MAX_EXPONENT, MAX_URL, GateInfo, InfoError, parse_info
from headend.sealed import Sealer
from headend.store import StoreError, open_database
from protocol import contract
from protocol.beacon import eid as beacon_eid
from protocol.beacon import frames
from protocol.errors import ConfigError

log = logging.getLogger("tapgate.headend.beacons")

MAX_GATE = 64
EID_KEY_BYTES = 16
SLACK_PERIODS = 1  # EIDs of the neighbouring rotation periods resolve too (clock drift)

IBEACON, UID, URL, EID, TLM = (
    "ibeacon", "eddystone-uid", "eddystone-url", "eddystone-eid", "eddystone-tlm")

STORED, SAME, STALE, REFUSED, CLEARED = "stored", "same", "stale", "refused", "cleared"


class NoDatabaseKey(ConfigError):
    """An EID key to seal or open, and no database key to do it with."""

    def __init__(self, why: str) -> None:
        super().__init__(sealed.OPTION, "(none)", why)


class NotAnIdentity(ValueError):
    """Advertising data that names no gate at all: not a beacon frame, or a TLM frame."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """The gate a phone's beacon frame names, and its page."""

    gate: str
    frame: str  # which identifier matched: ibeacon, eddystone-uid/-url/-eid
    name: str | None  # None: an EID of a registered gate that has published no info yet
    station: str | None
    page_url: str | None
    status: str | None
    fares: dict[str, Any]
    ts_ms: int | None  # of the info this comes from

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _tables(db: peewee.Database) -> tuple[Any, Any]:
    class InfoRow(peewee.Model):
        gate = peewee.CharField(max_length=MAX_GATE, primary_key=True)
        ts_ms = peewee.BigIntegerField()
        name = peewee.TextField()
        station = peewee.TextField(null=True)
        status = peewee.CharField(max_length=64)
        page_url = peewee.CharField(max_length=MAX_URL, null=True, index=True)
        ibeacon_uuid = peewee.CharField(max_length=36, null=True)
        ibeacon_major = peewee.IntegerField(null=True)
        ibeacon_minor = peewee.IntegerField(null=True)
        uid_namespace = peewee.CharField(max_length=20, null=True)
        uid_instance = peewee.CharField(max_length=12, null=True)
        url = peewee.CharField(max_length=MAX_URL, null=True, index=True)
        eid_exponent = peewee.IntegerField(null=True)
        eid_epoch = peewee.BigIntegerField(null=True)
        info_json = peewee.TextField()  # the message as the gate published it
        received_ms = peewee.BigIntegerField()

        class Meta:
            database = db
            table_name = "beacon_info"
            indexes = (
                (("ibeacon_uuid", "ibeacon_major", "ibeacon_minor"), False),
                (("uid_namespace", "uid_instance"), False),
            )

    class EidRow(peewee.Model):
        gate = peewee.CharField(max_length=MAX_GATE, primary_key=True)
        # "" once sealed; plain hex only in rows written before keys were sealed
        identity_key = peewee.CharField(max_length=2 * EID_KEY_BYTES)
        sealed_key = peewee.TextField(null=True)  # headend.sealed: the key, encrypted
        exponent = peewee.IntegerField()
        epoch = peewee.BigIntegerField()
        registered_ms = peewee.BigIntegerField()

        class Meta:
            database = db
            table_name = "beacon_eid"

    return InfoRow, EidRow


class BeaconDirectory:
    """The gates' beacon identifiers, in the head-end's database.

    ``BeaconDirectory(url)`` opens a database of its own; ``BeaconDirectory(store.db)``
    shares the store's (the consumer's way: one connection per thread either way).
    """

    def __init__(self, db: str | peewee.Database, *, slack_periods: int = SLACK_PERIODS,
                 sealer: Sealer | None = None) -> None:
        self.url = db if isinstance(db, str) else str(db.database)
        self._own = isinstance(db, str)
        self.db = open_database(db) if isinstance(db, str) else db
        if slack_periods < 0:
            raise ValueError(f"EID slack {slack_periods} periods is negative")
        self.slack_periods = slack_periods
        self._sealer = sealer  # None: EID keys can be neither registered nor resolved
        self._info, self._eid = _tables(self.db)

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> BeaconDirectory:
        try:
            self.db.connect(reuse_if_open=True)
            with self.db.atomic():
                self.db.create_tables([self._info, self._eid], safe=True)
                self._migrate()
        except peewee.PeeweeException as err:
            raise StoreError(f"cannot open the beacon directory in {self.url}: {err}") from err
        return self

    def _migrate(self) -> None:
        """Databases from before keys were sealed: the column added, and plain keys sealed
        once the database key is given."""
        if "sealed_key" not in {c.name for c in self.db.get_columns("beacon_eid")}:
            self.db.execute_sql(  # type: ignore[no-untyped-call]
                'ALTER TABLE "beacon_eid" ADD COLUMN "sealed_key" TEXT')
        E = self._eid
        plain = list(E.select(E.gate, E.identity_key).where(E.identity_key != ""))
        if plain and self._sealer is None:
            log.warning("%d EID identity keys are in plain hex in %s: open it with the "
                        "database key (%s) to seal them", len(plain), self.url, sealed.OPTION)
        elif plain and self._sealer is not None:
            for row in plain:
                E.update(sealed_key=self._sealer.seal(row.gate, bytes.fromhex(
                    row.identity_key)), identity_key="").where(E.gate == row.gate).execute()
            log.info("%d EID identity keys in plain hex sealed", len(plain))

    def close(self) -> None:
        if self._own and not self.db.is_closed():
            self.db.close()

    def __enter__(self) -> BeaconDirectory:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the gates' info ---------------------------------------------------------------
    def ingest(self, gate: str, payload: bytes, *, now_ms: int | None = None) -> str:
        """Take one message of ``gate``'s info topic; returns what became of it (STORED,
        SAME, STALE, REFUSED, CLEARED). Only database trouble raises (StoreError)."""
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        if not payload:  # the retained info cleared: the gate is gone
            return self._clear(gate)
        if not 0 < len(gate) <= MAX_GATE or gate == contract.FLEET:
            log.warning("info of gate %r refused: not a gate id", gate)
            return REFUSED
        try:
            info = parse_info(gate, payload, now_ms=now)
        except InfoError as err:
            log.warning("info of %s refused: %s", gate, err)
            return REFUSED
        try:
            with self.db.atomic():
                return self._upsert(info, now)
        except peewee.PeeweeException as err:
            raise StoreError(f"cannot store the info of {gate}: {err}") from err

    def _upsert(self, info: GateInfo, now: int) -> str:
        Info = self._info
        held = Info.get_or_none(Info.gate == info.gate)
        if held is not None and held.ts_ms >= info.ts_ms:
            if held.ts_ms > info.ts_ms:
                log.info("info of %s from ts_ms %d ignored: %d is newer", info.gate,
                         info.ts_ms, held.ts_ms)
            return SAME if held.ts_ms == info.ts_ms else STALE
        ib: tuple[Any, ...] = info.ibeacon or (None, None, None)
        uid: tuple[Any, ...] = info.uid or (None, None)
        eid: tuple[Any, ...] = info.eid or (None, None)
        row = dict(gate=info.gate, ts_ms=info.ts_ms, name=info.name, station=info.station,
                   status=info.status, page_url=info.page_url, ibeacon_uuid=ib[0],
                   ibeacon_major=ib[1], ibeacon_minor=ib[2], uid_namespace=uid[0],
                   uid_instance=uid[1], url=info.url, eid_exponent=eid[0], eid_epoch=eid[1],
                   info_json=info.text, received_ms=now)
        # The WHERE keeps the newest even when instances sharing the database race.
        Info.insert(**row).on_conflict(
            conflict_target=[Info.gate], preserve=[f for f in Info._meta.sorted_fields
                                                if f.name != "gate"],
            where=(Info.ts_ms < peewee.EXCLUDED.ts_ms)).execute()
        self._warn(info)
        log.info("info of %s stored (ts_ms %d, %s)", info.gate, info.ts_ms, info.status)
        return STORED

    def _warn(self, info: GateInfo) -> None:
        """Say what in this info cannot work: identifiers another gate has too, a URL no
        Eddystone-URL frame can carry, EID parameters other than the registered ones."""
        Info = self._info
        if info.url:
            try:
                frames.encode_url(info.url)
            except frames.FrameError as err:
                log.warning("beacon.eddystone_url of %s cannot go on air: %s", info.gate, err)
        clashes: list[tuple[str, Any]] = []
        if info.ibeacon:
            clashes.append((IBEACON, (Info.ibeacon_uuid == info.ibeacon[0])
                            & (Info.ibeacon_major == info.ibeacon[1])
                            & (Info.ibeacon_minor == info.ibeacon[2])))
        if info.uid:
            clashes.append((UID, (Info.uid_namespace == info.uid[0])
                            & (Info.uid_instance == info.uid[1])))
        if info.url:
            clashes.append((URL, Info.url == info.url))
        for kind, where in clashes:
            others = [r.gate for r in
                      Info.select(Info.gate).where(where & (Info.gate != info.gate))]
            if others:
                log.warning("%s of %s is also %s's: it resolves to none of them", kind,
                            info.gate, ", ".join(others))
        reg = self._eid.get_or_none(self._eid.gate == info.gate)
        if reg is not None and info.eid is not None and info.eid != (reg.exponent, reg.epoch):
            log.warning("%s says EID exponent %d epoch %d, registered %d epoch %d: the "
                        "registration is used", info.gate, *info.eid, reg.exponent, reg.epoch)

    def _clear(self, gate: str) -> str:
        try:
            with self.db.atomic():
                gone = self._info.delete().where(self._info.gate == gate).execute()
        except peewee.PeeweeException as err:
            raise StoreError(f"cannot clear the info of {gate}: {err}") from err
        if gone:
            log.info("info of %s cleared (empty retained message)", gate)
        return CLEARED

    # -- EID identities ----------------------------------------------------------------
    def register_eid(self, gate: str, identity_key: bytes, exponent: int, epoch: int, *,
                     now_ms: int | None = None) -> None:
        """Register (or replace) ``gate``'s EID identity key, rotation exponent and epoch."""
        if not 0 < len(gate) <= MAX_GATE or gate == contract.FLEET:
            raise ValueError(f"gate {gate!r} is not a gate id")
        if len(identity_key) != EID_KEY_BYTES:
            raise ValueError(f"an EID identity key is {EID_KEY_BYTES} bytes, "
                             f"not {len(identity_key)}")
        if not 0 <= exponent <= MAX_EXPONENT:
            raise ValueError(f"exponent {exponent} is not 0..{MAX_EXPONENT}")
        if epoch < 0:
            raise ValueError(f"epoch {epoch} is before 1970")
        beacon_eid.EidSchedule(identity_key, exponent, epoch)  # its own checks
        if self._sealer is None:
            raise NoDatabaseKey(f"an EID identity key is kept sealed: give the database key "
                                f"({sealed.OPTION} or {sealed.ENV})")
        E = self._eid
        row = dict(gate=gate, identity_key="", sealed_key=self._sealer.seal(gate, identity_key),
                   exponent=exponent, epoch=epoch,
                   registered_ms=now_ms if now_ms is not None else int(time.time() * 1000))
        try:
            with self.db.atomic():
                E.insert(**row).on_conflict(
                    conflict_target=[E.gate],
                    preserve=[E.identity_key, E.sealed_key, E.exponent, E.epoch,
                              E.registered_ms]).execute()
        except peewee.PeeweeException as err:
            raise StoreError(f"cannot register the EID of {gate}: {err}") from err

    def schedules(self) -> dict[str, beacon_eid.EidSchedule]:
        E = self._eid
        return {r.gate: beacon_eid.EidSchedule(self._identity(r), r.exponent, r.epoch)
                for r in E.select().order_by(E.gate)}

    def _identity(self, row: Any) -> bytes:
        if not row.sealed_key:
            return bytes.fromhex(row.identity_key)  # written before keys were sealed
        if self._sealer is None:
            raise NoDatabaseKey(f"the EID identity keys are sealed: give the database key "
                                f"({sealed.OPTION} or {sealed.ENV}) to resolve an EID")
        return self._sealer.open(row.gate, row.sealed_key)

    # -- reading -----------------------------------------------------------------------
    def resolve(self, payload: bytes, now: float | None = None) -> Resolution | None:
        """The gate whose beacon put ``payload`` (advertising data) on air, or None when
        no gate owns that identifier. :class:`NotAnIdentity` for bytes that are no beacon
        frame, and for a TLM frame (telemetry names no gate)."""
        try:
            frame = frames.parse(payload)
        except frames.FrameError as err:
            raise NotAnIdentity(f"not a beacon frame: {err}") from err
        Info = self._info
        try:
            if isinstance(frame, frames.IBeaconFrame):
                return self._one(IBEACON, (Info.ibeacon_uuid == str(frame.uuid))
                                 & (Info.ibeacon_major == frame.major)
                                 & (Info.ibeacon_minor == frame.minor))
            if isinstance(frame, frames.UidFrame):
                return self._one(UID, (Info.uid_namespace == frame.namespace.hex())
                                 & (Info.uid_instance == frame.instance.hex()))
            if isinstance(frame, frames.UrlFrame):
                return (self._one(URL, Info.url == frame.url)
                        or self._one(URL, Info.page_url == frame.url))
            if isinstance(frame, frames.EidFrame):
                when = time.time() if now is None else now
                gate = beacon_eid.resolve(frame.eid, self.schedules(), when,
                                          slack_periods=self.slack_periods)
                return None if gate is None else self._gate(gate, EID)
        except peewee.PeeweeException as err:
            raise StoreError(f"cannot read the beacon directory in {self.url}: {err}") from err
        raise NotAnIdentity(f"a {type(frame).__name__} names no gate (telemetry only)")

    def _one(self, kind: str, where: Any) -> Resolution | None:
        rows = list(self._info.select().where(where).limit(2))
        if len(rows) > 1:
            log.warning("%s names more than one gate (%s, ...): not resolved", kind,
                        rows[0].gate)
            return None
        return _resolution(rows[0], rows[0].gate, kind) if rows else None

    def _gate(self, gate: str, kind: str) -> Resolution:
        return _resolution(self._info.get_or_none(self._info.gate == gate), gate, kind)

    def info(self, gate: str) -> dict[str, Any] | None:
        """The newest info ``gate`` published, as it published it."""
        try:
            row = self._info.get_or_none(self._info.gate == gate)
        except peewee.PeeweeException as err:
            raise StoreError(f"cannot read the beacon directory in {self.url}: {err}") from err
        return None if row is None else dict(json.loads(row.info_json))

    def gates(self) -> Iterator[dict[str, Any]]:
        """Every gate the directory knows, by info or EID registration; never the keys."""
        Info, E = self._info, self._eid
        try:
            infos = {r.gate: r for r in Info.select()}
            regs = {r.gate: r for r in E.select()}
        except peewee.PeeweeException as err:
            raise StoreError(f"cannot read the beacon directory in {self.url}: {err}") from err
        for gate in sorted(infos.keys() | regs.keys()):
            row, reg = infos.get(gate), regs.get(gate)
            yield {
                "gate": gate,
                "name": row.name if row else None, "station": row.station if row else None,
                "status": row.status if row else None,
                "page_url": row.page_url if row else None,
                "ts_ms": row.ts_ms if row else None,
                "ibeacon": None if row is None or row.ibeacon_uuid is None else {
                    "uuid": row.ibeacon_uuid, "major": row.ibeacon_major,
                    "minor": row.ibeacon_minor},
                "eddystone_uid": None if row is None or row.uid_namespace is None else {
                    "namespace": row.uid_namespace, "instance": row.uid_instance},
                "eddystone_url": row.url if row else None,
                "eid": None if reg is None else {
                    "exponent": reg.exponent, "epoch": reg.epoch,
                    "registered_ms": reg.registered_ms},
            }


def _resolution(row: Any, gate: str, kind: str) -> Resolution:
    if row is None:
        return Resolution(gate=gate, frame=kind, name=None, station=None, page_url=None,
                          status=None, fares={}, ts_ms=None)
    fares = json.loads(row.info_json).get("fares") or {}
    return Resolution(gate=gate, frame=kind, name=row.name, station=row.station,
                      page_url=row.page_url, status=row.status, fares=dict(fares),
                      ts_ms=row.ts_ms)
