"""The one exception hierarchy of tapgate.

Foreign exceptions (pyscard, sqlite3, D-Bus, paho) are wrapped only at the HAL or
journal boundary with ``raise ... from err``; everything above sees these types.
"""

from __future__ import annotations


class TapgateError(Exception):
    """Root of every error tapgate raises on purpose."""


class ConfigError(TapgateError):
    """A configuration value is missing, malformed or out of range."""

    def __init__(self, key: str, value: object, why: str) -> None:
        self.key = key
        self.value = value
        self.why = why
        # a key from the file may hold anything TOML quotes (a newline, a NUL): shown
        # quoted then, so the message stays one line
        shown = key if key.isprintable() else repr(key)
        super().__init__(f"config {shown} = {value!r}: {why}")


class HardwareUnavailable(TapgateError):
    """A hardware backend (reader, SAM, gate I/O, radio) cannot be used right now."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(f"{kind}: {message}")


class BackendMissing(HardwareUnavailable):
    """The driver package a configured backend needs is not installed."""

    def __init__(self, kind: str, backend: str, package: str) -> None:
        self.backend = backend
        self.package = package
        super().__init__(kind, f"backend {backend!r} needs the package {package!r}: install it")


class CardGone(TapgateError):
    """The card left the field (or the reader lost it) during an exchange."""


class CardFault(TapgateError):
    """The card answered something the protocol does not allow."""

    def __init__(self, command: str, message: str, response: bytes = b"") -> None:
        self.command = command
        self.response = response
        super().__init__(f"{command}: {message} (response {response.hex().upper() or 'empty'})")


class CardStatus(CardFault):
    """The card answered a well-formed but refusing status word."""

    def __init__(self, command: str, sw: int, response: bytes = b"") -> None:
        self.sw = sw
        super().__init__(command, f"status word {sw:04X}", response)


class SamError(TapgateError):
    """The SAM refused or failed a cryptographic operation."""


class JournalError(TapgateError):
    """The journal cannot be opened, read or written safely."""


class JournalFull(JournalError):
    """The disk under the journal is full: no new debit may start."""


class SyncError(TapgateError):
    """The uplink to the head-end failed."""
