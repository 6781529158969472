"""Logging: to journald with priorities and fields when systemd runs us, readable lines
on a terminal.

journald's native protocol is one datagram of ``KEY=value`` lines on its socket; fields
the card loop attaches with ``extra=`` (card_serial, outcome, journal_id) become
CARD_SERIAL=, OUTCOME=, JOURNAL_ID= so an operator can `journalctl OUTCOME=tap_again`.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import traceback

JOURNAL_SOCKET = "/run/systemd/journal/socket"
FIELDS = ("card_serial", "outcome", "journal_id")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def _priority(levelno: int) -> int:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def _field(name: str, value: str) -> bytes:
    if "\n" in value:  # journald's binary-safe form: name, newline, le64 length, data
        data = value.encode("utf-8", "replace")
        return name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
    return f"{name}={value}\n".encode("utf-8", "replace")


class JournaldHandler(logging.Handler):
    """Sends records to journald natively; falls back to stderr if the socket goes away."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = "tapgate") -> None:
        super().__init__()
        self._path = path
        self._identifier = identifier
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._fallback = logging.StreamHandler(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + "".join(traceback.format_exception(*record.exc_info))
            parts = [
                _field("MESSAGE", message),
                _field("PRIORITY", str(_priority(record.levelno))),
                _field("SYSLOG_IDENTIFIER", self._identifier),
                _field("LOGGER", record.name),
                _field("CODE_FILE", record.pathname),
                _field("CODE_LINE", str(record.lineno)),
                _field("CODE_FUNC", record.funcName),
            ]
            for name in FIELDS:
                value = getattr(record, name, None)
                if value not in (None, ""):
                    parts.append(_field(name.upper(), str(value)))
            self._sock.sendto(b"".join(parts), self._path)
        except OSError:
            self._fallback.emit(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._sock.close()
        super().close()


def under_journald() -> bool:
    """systemd sets JOURNAL_STREAM to our stderr's device:inode when stderr is journald."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream or ":" not in stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup(level: str, *, journald: bool | None = None, socket_path: str = JOURNAL_SOCKET) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    use_journald = under_journald() if journald is None else journald
    handler: logging.Handler
    if use_journald:
        handler = JournaldHandler(socket_path)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
