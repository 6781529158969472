"""The head-end database's tables and the statements of every batch: standard SQL for
SQLite and PostgreSQL alike, written out once (peewee's query building costs more per
batch than the database's own work); "?" becomes the driver's placeholder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import peewee

from headend import verify


def tables(db: peewee.Database) -> tuple[Any, Any, Any, Any]:
    """Model classes bound to ``db`` (several stores may live in one process)."""

    class EntryRow(peewee.Model):
        id = peewee.AutoField()
        gate = peewee.CharField(max_length=64)
        uuid = peewee.CharField(max_length=verify.MAX_UUID, unique=True)
        entry_id = peewee.BigIntegerField(null=True)  # the gate's journal id
        kind = peewee.CharField(max_length=32, null=True)
        state = peewee.CharField(max_length=32, null=True)
        prev_hash = peewee.CharField(max_length=64, null=True)
        hash = peewee.CharField(max_length=64, null=True)
        created_ms = peewee.BigIntegerField(null=True)
        entry_json = peewee.TextField()  # the fields as the gate exported them
        batch = peewee.CharField(max_length=128)  # the batch that first brought it
        received_ms = peewee.BigIntegerField()
        stored_by = peewee.CharField(max_length=128)  # the head-end instance
        hash_state = peewee.CharField(max_length=16)
        sig_state = peewee.CharField(max_length=16)
        tac_state = peewee.CharField(max_length=16)
        chain_state = peewee.CharField(max_length=16)
        notes = peewee.TextField(null=True)  # JSON list: problems beyond the four checks
        problems = peewee.TextField(null=True)  # the flag: NULL when clean, else the reasons

        class Meta:
            database = db
            table_name = "entry"
            indexes = ((("gate", "entry_id"), False),)

    class GateRow(peewee.Model):
        gate = peewee.CharField(max_length=64, primary_key=True)
        entries = peewee.BigIntegerField(default=0)
        head_id = peewee.BigIntegerField(default=0)  # the highest entry id stored
        contiguous_through = peewee.BigIntegerField(default=0)  # ids 1..n all stored
        pending = peewee.BigIntegerField(default=0)  # entries waiting for their predecessor
        broken = peewee.BigIntegerField(default=0)  # links that do not hold
        first_seen_ms = peewee.BigIntegerField()
        last_seen_ms = peewee.BigIntegerField()

        class Meta:
            database = db
            table_name = "gate"

    class RejectedRow(peewee.Model):
        id = peewee.AutoField()
        gate = peewee.CharField(max_length=64)
        batch = peewee.CharField(max_length=128)
        uuid = peewee.CharField(max_length=verify.MAX_UUID, null=True)
        payload = peewee.TextField()
        why = peewee.TextField()
        received_ms = peewee.BigIntegerField()
        stored_by = peewee.CharField(max_length=128)

        class Meta:
            database = db
            table_name = "rejected"

    class MetaRow(peewee.Model):
        key = peewee.CharField(max_length=64, primary_key=True)
        value = peewee.TextField()

        class Meta:
            database = db
            table_name = "meta"

    return EntryRow, GateRow, RejectedRow, MetaRow


LOCK_GATE = (
    'INSERT INTO "gate" ("gate", "entries", "head_id", "contiguous_through", "pending", '
    '"broken", "first_seen_ms", "last_seen_ms") VALUES (?, 0, 0, 0, 0, 0, ?, ?) '
    'ON CONFLICT ("gate") DO UPDATE SET "last_seen_ms" = EXCLUDED."last_seen_ms"')
KNOWN = ('SELECT "id", "uuid", "gate", "entry_json", "problems" FROM "entry" '
          'WHERE "uuid" IN ')
# (an index added to databases made before it, at their next open)
REJECTED_INDEX = 'CREATE INDEX IF NOT EXISTS "rejected_uuid" ON "rejected" ("uuid")'
REJECTED = 'SELECT "gate", "uuid", "payload" FROM "rejected" WHERE "uuid" IN '
# A displaced copy: out of its gate's counts, its successor linked again.
ROW = 'SELECT "gate", "entry_id", "chain_state" FROM "entry" WHERE "id" = ?'
DELETE = 'DELETE FROM "entry" WHERE "id" = ?'
HEAD = 'SELECT MAX("entry_id") FROM "entry" WHERE "gate" = ?'
UNCOUNT = (
    'UPDATE "gate" SET "entries" = "entries" - 1, "pending" = "pending" - ?, '
    '"broken" = "broken" - ?, "head_id" = ?, "contiguous_through" = CASE WHEN '
    '"contiguous_through" > ? THEN ? ELSE "contiguous_through" END WHERE "gate" = ?')
NEXT = ('SELECT "id", "prev_hash", "chain_state", "hash_state", "sig_state", "tac_state", '
         '"notes" FROM "entry" WHERE "gate" = ? AND "entry_id" = ?')
THROUGH = 'SELECT "contiguous_through" FROM "gate" WHERE "gate" = ?'
RECOUNT = ('UPDATE "gate" SET "pending" = "pending" + ?, "broken" = "broken" + ?, '
            '"contiguous_through" = ? WHERE "gate" = ?')
HASHES = 'SELECT "entry_id", "hash" FROM "entry" WHERE "gate" = ? AND "entry_id" IN '
WAITING = ('SELECT "id", "entry_id", "prev_hash", "hash_state", "sig_state", "tac_state", '
            '"notes" FROM "entry" WHERE "gate" = ? AND "chain_state" = ? AND "entry_id" IN ')
SETTLE = 'UPDATE "entry" SET "chain_state" = ?, "problems" = ? WHERE "id" = ?'
GATE = 'SELECT "head_id", "contiguous_through" FROM "gate" WHERE "gate" = ?'
AFTER = ('SELECT DISTINCT "entry_id" FROM "entry" WHERE "gate" = ? AND "entry_id" > ? '
          'ORDER BY "entry_id" LIMIT ?')
UPDATE_GATE = (
    'UPDATE "gate" SET "entries" = "entries" + ?, "pending" = "pending" + ?, '
    '"broken" = "broken" + ?, "head_id" = ?, "contiguous_through" = ? WHERE "gate" = ?')

# The entries whose hash, signature and TAC are not checked yet: a partial index holds
# them (and nothing else), in both databases; the literal 'pending' lets both use it.
UNVERIFIED_INDEX = ('CREATE INDEX IF NOT EXISTS "entry_unverified" ON "entry" ("id") '
                     f"WHERE \"hash_state\" = '{verify.NOT_YET}'")
# "id" modulo N written out: to some drivers % is a placeholder
UNVERIFIED = ('SELECT "id", "gate", "entry_json" FROM "entry" '
               f"WHERE \"hash_state\" = '{verify.NOT_YET}' "
               'AND "id" - ("id" / ?) * ? = ? ORDER BY "id" LIMIT ?')
# (a subquery in id order, or SQLite walks the whole (gate, entry_id) index to group)
UNVERIFIED_PER_GATE = ('SELECT "gate", COUNT(*) FROM (SELECT "gate" FROM "entry" '
                        f"WHERE \"hash_state\" = '{verify.NOT_YET}' ORDER BY \"id\") "
                        'AS "waiting" GROUP BY "gate"')
# PostgreSQL: the gate row's lock, which every batch of the gate takes first (LOCK_GATE)
HOLD_GATE = 'UPDATE "gate" SET "last_seen_ms" = "last_seen_ms" WHERE "gate" = ?'
STILL_PENDING = ('SELECT "id", "chain_state", "notes" FROM "entry" '
                  f"WHERE \"hash_state\" = '{verify.NOT_YET}' AND \"id\" IN ")
VERDICTS = ('UPDATE "entry" SET "hash_state" = ?, "sig_state" = ?, "tac_state" = ?, '
             '"notes" = ?, "problems" = ? WHERE "id" = ? AND '
             f"\"hash_state\" = '{verify.NOT_YET}'")



def params(values: Sequence[Any]) -> str:
    return "(" + ", ".join("?" * len(values)) + ")"
