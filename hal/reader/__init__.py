"""Card readers: wait for a card, exchange APDUs, see it leave."""

from hal.reader.base import CardLink, Reader, ReaderState

__all__ = ["CardLink", "Reader", "ReaderState"]
