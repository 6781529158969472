"""The journal's tables and their migrations.

The schema version lives in ``PRAGMA user_version``. A journal from a newer tapgate is
refused rather than guessed at; an older one is migrated in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable

import peewee

SCHEMA_VERSION = 6

# Each migration is frozen DDL: what the schema was at that version, so an old journal
# and a new one end up with the same tables.
_V1 = (
    'CREATE TABLE "entry" ("id" INTEGER NOT NULL PRIMARY KEY, "uuid" VARCHAR(32) NOT NULL, '
    '"kind" VARCHAR(16) NOT NULL, "state" VARCHAR(16) NOT NULL, "terminal_id" BLOB NOT NULL, '
    '"amount" INTEGER NOT NULL, "reason" TEXT, "card_serial" BLOB, "card_type" INTEGER, '
    '"balance_before" INTEGER, "balance_after" INTEGER, "card_counter" INTEGER, '
    '"card_random" BLOB, "terminal_seq" INTEGER, "tx_date" VARCHAR(8), "tx_time" VARCHAR(6), '
    '"mac2" BLOB, "tac" BLOB, "ref" INTEGER, "created_ms" INTEGER NOT NULL, '
    '"prev_hash" BLOB NOT NULL, "hash" BLOB NOT NULL)',
    'CREATE UNIQUE INDEX "entryrow_uuid" ON "entry" ("uuid")',
    'CREATE INDEX "entryrow_ref" ON "entry" ("ref")',
    'CREATE INDEX "entryrow_card_serial_id" ON "entry" ("card_serial", "id")',
    'CREATE TABLE "meta" ("key" VARCHAR(255) NOT NULL PRIMARY KEY, "value" TEXT NOT NULL)',
)
# v2: each entry's signature (Ed25519 over its hash, by the gate's device key), outside
# the hash.
_V2 = ('ALTER TABLE "entry" ADD COLUMN "sig" BLOB',)
# v3: sync state (when the head-end acknowledged an entry: not part of the entry or its
# hash). The uplink reads the unacknowledged entries in id order through the
# partial index, which holds only them: it stays small however long the journal grows.
_V3 = (
    'ALTER TABLE "entry" ADD COLUMN "acked_ms" INTEGER',
    'CREATE INDEX "entry_unacked" ON "entry" ("id") WHERE "acked_ms" IS NULL',
)
# v4: the tears of one card, found on every tap without reading the card's whole history
# (a staff card may pass a gate thousands of times).
_V4 = (
    'CREATE INDEX "entry_torn_by_card" ON "entry" ("card_serial", "id") '
    "WHERE \"kind\" = 'debit' AND \"state\" = 'torn'",
)

# v5: remote management. The highest command sequence number applied per operator key
# (replays are refused across restarts), the deny list with its version, and the config
# values set remotely (gate.* dotted key -> JSON value), re-applied at every start. The
# deny list's version and the desired state's version live in meta.
_V5 = (
    'CREATE TABLE "command_seq" ("key_id" VARCHAR(64) NOT NULL PRIMARY KEY, '
    '"seq" INTEGER NOT NULL)',
    'CREATE TABLE "deny_list" ("serial" BLOB NOT NULL PRIMARY KEY)',
    'CREATE TABLE "remote_config" ("key" VARCHAR(64) NOT NULL PRIMARY KEY, '
    '"value" TEXT NOT NULL)',
)

# v6: the answer each command got, kept with its seq (the last few per operator key): an
# operator's tool that had no answer sends the same seq again and is told what the gate
# said the first time, instead of "replayed" (or applying it twice under a new seq).
# ``digest`` is of the command's target, name and args: only the same command gets it.
_V6 = (
    'CREATE TABLE "command_answer" ("key_id" VARCHAR(64) NOT NULL, "seq" INTEGER NOT NULL, '
    '"digest" BLOB NOT NULL, "reply" TEXT NOT NULL, PRIMARY KEY ("key_id", "seq"))',
)


def _ddl(*statements: str) -> Callable[[peewee.SqliteDatabase], None]:
    def migrate(db: peewee.SqliteDatabase) -> None:
        for statement in statements:
            db.execute_sql(statement)  # type: ignore[no-untyped-call]

    return migrate


MIGRATIONS: dict[int, Callable[[peewee.SqliteDatabase], None]] = {
    1: _ddl(*_V1),
    2: _ddl(*_V2),
    3: _ddl(*_V3),
    4: _ddl(*_V4),
    5: _ddl(*_V5),
    6: _ddl(*_V6),
}
