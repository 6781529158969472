"""The journal's statements on its entry and meta tables, each written once.

The entry table's columns are the entry's fields (``protocol.entry``), and the JSON the
uplink sends is built here from the entry's wire form (``WIRE_FORM``), so that SQLite
writes what ``Entry.to_json`` says, key for key. The statements every tap runs are
plain strings, prepared once by SQLite: peewee's query building costs more per tap
than SQLite's own work.
"""

from __future__ import annotations

from protocol.entry import (
    COMPLETED,
    ENTRY_FIELDS,
    INTENT,
    KIND_DEBIT,
    KIND_PASS,
    KIND_RECOVERY,
    RECOVERED,
    TORN,
    UNPROVEN,
    WIRE_FORM,
    WIRE_HEX,
    WIRE_INT,
    WIRE_TEXT,
    WireField,
)

COLUMNS = ", ".join(ENTRY_FIELDS)

# -- meta: what outlives the entries pruned ---------------------------------------------
CHAIN_ANCHOR = "chain_anchor"  # the hash of the last entry pruned: the first kept follows it
MAX_TERMINAL_SEQ = "max_terminal_seq"  # the highest terminal sequence number ever used
GET_META = "SELECT value FROM meta WHERE key = ?"
SET_META = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"

# -- the chain --------------------------------------------------------------------------
INSERT = f"INSERT INTO entry ({COLUMNS}) VALUES ({', '.join('?' * len(ENTRY_FIELDS))})"
GET = f"SELECT {COLUMNS} FROM entry WHERE id = ?"
AFTER = f"SELECT {COLUMNS} FROM entry WHERE id > ? ORDER BY id LIMIT ?"
COUNT = "SELECT COUNT(*) FROM entry"
TAIL = "SELECT id, hash FROM entry ORDER BY id DESC LIMIT 1"
MAX_SEQ = "SELECT MAX(terminal_seq) FROM entry"
FIRST_ID = "SELECT MIN(id) FROM entry"
LAST_ID = "SELECT MAX(id) FROM entry"
# what a run pruned from the start leaves behind: its last hash, its highest sequence
PRUNED_RUN = ("SELECT (SELECT hash FROM entry WHERE id = ?), MAX(terminal_seq) FROM entry "
              "WHERE id <= ?")
PRUNE_THROUGH = "DELETE FROM entry WHERE id <= ?"

# -- a tap's story (indexes: entry(card_serial, id), entry(ref), and the partial index of
# torn debits, entry_torn_by_card) ---------------------------------------------------------
# A torn debit (``t``) no recovery entry closes yet: the card must come back.
PENDING_TEAR = f"""t.kind = '{KIND_DEBIT}' AND t.state = '{TORN}'
      AND NOT EXISTS (SELECT 1 FROM entry AS r WHERE r.ref = t.id AND r.kind = '{KIND_RECOVERY}')"""
PENDING_FOR_CARD = f"""
    SELECT {COLUMNS} FROM entry AS t
    WHERE t.card_serial = ? AND {PENDING_TEAR}
    ORDER BY t.id"""
PENDING_ALL = f"""
    SELECT {COLUMNS} FROM entry AS t INDEXED BY entry_torn_by_card
    WHERE {PENDING_TEAR}
    ORDER BY t.id"""
# An intent no completion or tear follows: the process died mid-debit.
_DANGLING_INTENT = f"""i.kind = '{KIND_DEBIT}' AND i.state = '{INTENT}'
      AND NOT EXISTS (SELECT 1 FROM entry AS o WHERE o.ref = i.id AND o.kind = '{KIND_DEBIT}'
                      AND o.state IN ('{COMPLETED}', '{TORN}'))"""
DANGLING_INTENTS = f"SELECT {COLUMNS} FROM entry AS i WHERE {_DANGLING_INTENT} ORDER BY i.id"

# What opened the gate for a card: anti-passback counts these.
PASSAGE_KINDS = frozenset({(KIND_DEBIT, COMPLETED), (KIND_RECOVERY, RECOVERED),
                           (KIND_RECOVERY, UNPROVEN), (KIND_PASS, COMPLETED)})
_IS_PASSAGE = "(" + " OR ".join(f"(kind = '{kind}' AND state = '{state}')"
                                for kind, state in sorted(PASSAGE_KINDS)) + ")"
LAST_ACCEPTED = f"""
    SELECT id, created_ms FROM entry
    WHERE card_serial = ? AND {_IS_PASSAGE}
    ORDER BY id DESC LIMIT 1"""
PASSAGES_FLOOR = f"""
    SELECT MAX(created_ms) FROM entry
    WHERE id <= ? AND card_serial IS NOT NULL AND {_IS_PASSAGE}"""
PASSAGES_AFTER = f"""
    SELECT id, card_serial, created_ms FROM entry
    WHERE id > ? AND card_serial IS NOT NULL AND {_IS_PASSAGE}
    ORDER BY id"""
RECOVERY_COUNTS = (f"SELECT state, COUNT(*) FROM entry WHERE kind = '{KIND_RECOVERY}' "
                   "GROUP BY state")

# -- the outbox: INDEXED BY the partial index of unacknowledged entries, so these cost
# the backlog, not the journal's length --------------------------------------------------
_UNACKED_ROWS = "FROM entry INDEXED BY entry_unacked WHERE acked_ms IS NULL"
UNACKED = f"SELECT {COLUMNS} {_UNACKED_ROWS} AND id > ? ORDER BY id LIMIT ?"
PENDING_SYNC = f"SELECT COUNT(*) {_UNACKED_ROWS}"
OLDEST_UNACKED = f"SELECT created_ms {_UNACKED_ROWS} ORDER BY id LIMIT 1"
FIRST_UNACKED_ID = f"SELECT id {_UNACKED_ROWS} ORDER BY id LIMIT 1"
MARK_ACKED = "UPDATE entry SET acked_ms = ? WHERE uuid = ? AND acked_ms IS NULL"
MARK_ACKED_RUN = "UPDATE entry SET acked_ms = ? WHERE id BETWEEN ? AND ? AND acked_ms IS NULL"
# Retention: the first entry that must stay. Entries are read from the start, which is
# what goes; a pending tear keeps its intent too.
FIRST_YOUNG_ID = "SELECT id FROM entry WHERE created_ms >= ? ORDER BY id LIMIT 1"
FIRST_PENDING_TEAR_ID = (f"SELECT MIN(MIN(t.id, COALESCE(t.ref, t.id))) FROM entry AS t "
                         f"WHERE {PENDING_TEAR}")
FIRST_DANGLING_INTENT_ID = f"SELECT MIN(i.id) FROM entry AS i WHERE {_DANGLING_INTENT}"


# What the uplink sends: each entry's canonical JSON, written by SQLite from WIRE_FORM.
_SQL_TYPE = {WIRE_INT: "integer", WIRE_TEXT: "text", WIRE_HEX: "blob"}


def _wire_value(field: WireField) -> str:
    # A value of another type than its field's, which the journal never writes (a REAL,
    # whose format is not Python's, text in a blob column, ...), becomes a backslash:
    # the outbox then leaves the entry to Python.
    value = f"hex({field.name})" if field.kind == WIRE_HEX else field.name
    return (f"CASE typeof({field.name}) WHEN '{_SQL_TYPE[field.kind]}' THEN {value} "
            f"WHEN 'null' THEN NULL ELSE char(92) END")


WIRE_JSON = "json_object(" + ", ".join(
    f"'{field.name}', {_wire_value(field)}" for field in WIRE_FORM) + ")"
# The batch as one row: no Python object per entry, and one release of the GIL.
UNACKED_WIRE = ("SELECT group_concat(id), group_concat(uuid), group_concat(wire) FROM ("
                f"SELECT id, uuid, {WIRE_JSON} AS wire {_UNACKED_ROWS} "
                "AND id > ? ORDER BY id LIMIT ?)")

WAL_STATE = "SELECT total_changes(), (SELECT data_version FROM pragma_data_version)"

# -- what start-up relies on, checked before it is believed (integrity.check_start) -------
BETWEEN = f"SELECT {COLUMNS} FROM entry WHERE id BETWEEN ? AND ? ORDER BY id"
DANGLING_IDS = f"SELECT i.id FROM entry AS i WHERE {_DANGLING_INTENT}"
PENDING_TEAR_IDS = f"SELECT t.id FROM entry AS t INDEXED BY entry_torn_by_card WHERE {PENDING_TEAR}"
# The indexes start-up finds open intents and tears through, summed key by key against
# the table itself (quick_check never compares them): the ref index's (ref, id) pairs,
# and the partial index of tears' ids.
_REF_KEY = "(ref * 65537 + id) % 1000000007"
_IS_TEAR = f"kind = '{KIND_DEBIT}' AND state = '{TORN}'"
# one pass over the table; the same four numbers from the two indexes
SUMS_BY_TABLE = (f"SELECT COUNT(ref), SUM({_REF_KEY}), COUNT(CASE WHEN {_IS_TEAR} THEN 1 END), "
                 f"SUM(CASE WHEN {_IS_TEAR} THEN id % 1000000007 END) FROM entry NOT INDEXED")
SUMS_BY_INDEX = (f"SELECT (SELECT COUNT(ref) FROM entry INDEXED BY entryrow_ref "
                 f"WHERE ref IS NOT NULL), (SELECT SUM({_REF_KEY}) FROM entry INDEXED BY "
                 f"entryrow_ref WHERE ref IS NOT NULL), (SELECT COUNT(*) FROM entry INDEXED BY "
                 f"entry_torn_by_card WHERE {_IS_TEAR}), (SELECT SUM(id % 1000000007) FROM "
                 f"entry INDEXED BY entry_torn_by_card WHERE {_IS_TEAR})")

# The entries that refer to the open ones, and those the open ones refer to ({ids}: a
# list of integers the journal read itself).
REFERRING_IDS = "SELECT id, ref FROM entry WHERE ref IN ({ids}) OR id IN ({ids})"
