"""Logging to journald's native socket (a datagram socket the test owns) with priorities
and the tap fields, and readable lines on a terminal."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import logsetup


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def fields(datagram: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    rest = datagram
    while rest:
        line, _, rest = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            out[key.decode()] = value.decode()
        else:  # binary-safe form: NAME \n le64 length, data \n
            size = int.from_bytes(rest[:8], "little")
            out[line.decode()] = rest[8:8 + size].decode()
            rest = rest[8 + size + 1:]
    return out


def test_a_tap_goes_to_journald_with_its_fields(journald: tuple[socket.socket, str]) -> None:
    sock, path = journald
    handler = logsetup.JournaldHandler(path)
    log = logging.getLogger("tapgate.tap.test")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("tap %s: tap_again", "8801000000001234",
                    extra={"card_serial": "8801000000001234", "outcome": "tap_again",
                           "journal_id": 42})
        got = fields(sock.recv(65536))
        log.error("multi\nline")
        multi = fields(sock.recv(65536))
    finally:
        log.removeHandler(handler)
        handler.close()
    assert got["MESSAGE"] == "tap 8801000000001234: tap_again"
    assert got["PRIORITY"] == "4" and got["SYSLOG_IDENTIFIER"] == "tapgate"
    assert (got["CARD_SERIAL"], got["OUTCOME"], got["JOURNAL_ID"]) == (
        "8801000000001234", "tap_again", "42")
    assert got["LOGGER"] == "tapgate.tap.test"
    assert multi["MESSAGE"] == "multi\nline" and multi["PRIORITY"] == "3"


def test_journald_gone_falls_back_to_stderr(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    handler = logsetup.JournaldHandler(str(tmp_path / "no-such.sock"))
    record = logging.LogRecord("tapgate", logging.INFO, __file__, 1, "still seen", None, None)
    handler.emit(record)
    handler.close()
    assert "still seen" in capsys.readouterr().err


def test_journald_is_used_only_when_stderr_is_the_journal(monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logsetup.under_journald()
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not logsetup.under_journald()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not logsetup.under_journald()


def test_setup_picks_the_handler(journald: tuple[socket.socket, str]) -> None:
    _, path = journald
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        logsetup.setup("DEBUG", journald=True, socket_path=path)
        assert [type(h) for h in root.handlers] == [logsetup.JournaldHandler]
        logsetup.setup("INFO", journald=False)
        assert [type(h) for h in root.handlers] == [logging.StreamHandler]
        assert root.level == logging.INFO
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
