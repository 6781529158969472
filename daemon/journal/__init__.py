"""The journal: the gate's only source of truth."""

from daemon.journal.entry import Draft, Entry
from daemon.journal.store import Journal, VerifyReport

__all__ = ["Draft", "Entry", "Journal", "VerifyReport"]
