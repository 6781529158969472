"""The journal: the gate's only source of truth."""

from daemon.journal.store import Journal, VerifyReport

__all__ = ["Journal", "VerifyReport"]
