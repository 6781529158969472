"""The journal's tables, bound per database, and its migrations.

The schema version lives in ``PRAGMA user_version``. A journal from a newer tapgate is
refused rather than guessed at; an older one is migrated in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peewee

SCHEMA_VERSION = 1


class _Base(peewee.Model):
    pass


def bind(db: peewee.SqliteDatabase) -> tuple[Any, Any]:
    """Fresh model classes bound to ``db`` (several journals may live in one process)."""

    class EntryRow(_Base):
        id = peewee.AutoField()
        uuid = peewee.CharField(max_length=32, unique=True)
        kind = peewee.CharField(max_length=16)
        state = peewee.CharField(max_length=16)
        terminal_id = peewee.BlobField()
        amount = peewee.BigIntegerField()
        reason = peewee.TextField(null=True)
        card_serial = peewee.BlobField(null=True)
        card_type = peewee.IntegerField(null=True)
        balance_before = peewee.BigIntegerField(null=True)
        balance_after = peewee.BigIntegerField(null=True)
        card_counter = peewee.IntegerField(null=True)
        card_random = peewee.BlobField(null=True)
        terminal_seq = peewee.BigIntegerField(null=True)
        tx_date = peewee.CharField(max_length=8, null=True)
        tx_time = peewee.CharField(max_length=6, null=True)
        mac2 = peewee.BlobField(null=True)
        tac = peewee.BlobField(null=True)
        ref = peewee.IntegerField(null=True, index=True)
        created_ms = peewee.BigIntegerField()
        prev_hash = peewee.BlobField()
        hash = peewee.BlobField()

        class Meta:
            database = db
            table_name = "entry"
            indexes = ((("card_serial", "id"), False),)

    class MetaRow(_Base):
        key = peewee.CharField(primary_key=True)
        value = peewee.TextField()

        class Meta:
            database = db
            table_name = "meta"

    return EntryRow, MetaRow


def _v1(db: peewee.SqliteDatabase, models: tuple[Any, Any]) -> None:
    db.create_tables(list(models))


MIGRATIONS: dict[int, Callable[[peewee.SqliteDatabase, tuple[Any, Any]], None]] = {1: _v1}
