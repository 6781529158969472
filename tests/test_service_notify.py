"""The real daemon as systemd runs it with Type=notify and WatchdogSec=: `tapgate run` on the
sim backends, $NOTIFY_SOCKET naming a datagram socket this test owns, $WATCHDOG_USEC and
$WATCHDOG_PID set the way systemd sets them.

What systemd must hear: STATUS while it opens, READY=1 (with a STATUS) once the card loop
takes taps, WATCHDOG=1 over and over while the card loop goes round, and STOPPING=1 on
SIGTERM; no WATCHDOG=1 once the card loop hangs (so that systemd restarts it); and no
READY=1 from a daemon that cannot open its journal.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.configs import raw_config, toml_text
from tests.daemon_process import Daemon

WATCHDOG_USEC = 400_000  # WatchdogSec=0.4: the daemon pings every 0.2 s
STALENESS_S = 1.0  # service.watchdog_staleness_s: how long a silent card loop is trusted
START_TIMEOUT_S = 30.0  # generous: only a broken daemon should ever get near these
STOP_TIMEOUT_S = 30.0
HANG_WINDOW_S = 3 * STALENESS_S  # no ping may arrive in this long after the withholding

Messages = list[list[str]]  # each datagram as its KEY=value lines
SD_NOTIFY_KEYS = {"READY", "RELOADING", "STOPPING", "STATUS", "ERRNO", "BUSERROR", "EXIT_STATUS",
                  "MAINPID", "WATCHDOG", "WATCHDOG_USEC", "EXTEND_TIMEOUT_USEC", "MONOTONIC_USEC",
                  "NOTIFYACCESS"}


class Systemd:
    """systemd's side of one service: the notify socket, and the main process it started."""

    def __init__(self) -> None:
        # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer
        self._dir = Path(tempfile.mkdtemp(prefix="tg-sd-"))
        self.address = str(self._dir / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.messages: Messages = []
        self.daemon: Daemon | None = None

    @property
    def proc(self) -> subprocess.Popen[str] | None:
        return self.daemon.proc if self.daemon is not None else None

    @property
    def lines(self) -> list[str]:
        return self.daemon.lines if self.daemon is not None else []

    def start(self, config: Path, *overrides: str, watchdog_pid: str = "self") -> None:
        """`tapgate run` as the main process. ``watchdog_pid``: "self" sets WATCHDOG_PID to
        the daemon's own pid (as systemd does), "unset" leaves it out, anything else is
        used as is."""
        env = {"NOTIFY_SOCKET": self.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        prefix: list[str] = []
        if watchdog_pid == "self":
            # the shell's pid is the daemon's: exec keeps it
            prefix = ["/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh"]
        elif watchdog_pid != "unset":
            env["WATCHDOG_PID"] = watchdog_pid
        self.daemon = Daemon(config, *overrides, env=env, prefix=prefix)

    # -- the notify socket -----------------------------------------------------------------
    def receive(self, timeout: float) -> bool:
        """Take in every datagram already queued, waiting up to ``timeout`` for a first."""
        self.sock.settimeout(timeout)  # 0: non-blocking
        try:
            first = self.sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            return False
        got = [first]
        self.sock.setblocking(False)
        try:
            while True:
                got.append(self.sock.recv(4096))
        except BlockingIOError:
            pass
        self.messages += [data.decode().split("\n") for data in got]
        return True

    def drain(self) -> None:
        self.receive(0.0)

    def wait_message(self, predicate: Callable[[Messages], bool], what: str,
                     timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.messages):
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc is not None and self.proc.poll() is not None
                             and not self.receive(0.0)):
                self.fail(f"{what} never arrived")
            self.receive(min(left, 0.2))

    # -- the daemon's log ------------------------------------------------------------------
    def wait_log(self, text: str, timeout: float = START_TIMEOUT_S) -> None:
        assert self.daemon is not None
        if not self.daemon.until(lambda: self.log_count(text) > 0, timeout):
            self.fail(f"log line {text!r} never came")

    def log_count(self, text: str) -> int:
        return self.daemon.count(text) if self.daemon is not None else 0

    def fail(self, why: str) -> None:
        log = self.daemon.tail() if self.daemon is not None else "not started"
        pytest.fail(f"{why}\nmessages: {self.messages}\n{log}")

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self) -> int:
        assert self.daemon is not None
        self.daemon.proc.send_signal(signal.SIGTERM)
        return self._exited(STOP_TIMEOUT_S, f"no exit within {STOP_TIMEOUT_S} s of SIGTERM")

    def wait_exit(self) -> int:
        return self._exited(START_TIMEOUT_S, f"did not exit within {START_TIMEOUT_S} s")

    def _exited(self, timeout: float, why: str) -> int:
        assert self.daemon is not None
        try:
            rc = self.daemon.wait_exit(timeout)
        except subprocess.TimeoutExpired:
            self.fail(why)
        self.drain()
        return rc

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.kill(STOP_TIMEOUT_S)
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def systemd() -> Iterator[Systemd]:
    sd = Systemd()
    yield sd
    sd.close()  # a failed test leaves no daemon behind


def _config(tmp_path: Path, journal: Path | None = None) -> Path:
    raw = raw_config(journal or tmp_path / "journal.db")
    raw["service"] = {"watchdog_staleness_s": STALENESS_S}
    path = tmp_path / "tapgate.toml"
    path.write_text(toml_text(raw), encoding="utf-8")
    return path


def _has(message: list[str], assignment: str) -> bool:
    return assignment in message


def _status(message: list[str]) -> str | None:
    return next((a[len("STATUS="):] for a in message if a.startswith("STATUS=")), None)


def _index(messages: Messages, assignment: str) -> list[int]:
    return [i for i, m in enumerate(messages) if _has(m, assignment)]


def _pings_after(messages: Messages, start: int) -> int:
    return sum(_has(m, "WATCHDOG=1") for m in messages[start:])


# --- the life of a healthy daemon ------------------------------------------------------------
@pytest.mark.parametrize("watchdog_pid", ["self", "unset"])
def test_status_ready_watchdog_stopping_in_order(systemd: Systemd, tmp_path: Path,
                                                 watchdog_pid: str) -> None:
    systemd.start(_config(tmp_path), "reader.sim_interval_s=0.2", watchdog_pid=watchdog_pid)

    systemd.wait_message(lambda ms: bool(_index(ms, "READY=1")), "READY=1")
    ready = _index(systemd.messages, "READY=1")[0]
    # pings keep coming while taps are taken (a tap every 0.2 s, a ping every 0.2 s)
    systemd.wait_log(" tapgate.tap: tap ")
    systemd.wait_message(lambda ms: _pings_after(ms, ready + 1) >= 5, "5 WATCHDOG=1 after READY")
    taps_before_stop = systemd.log_count(" tapgate.tap: tap ")
    assert systemd.stop() == 0

    messages = systemd.messages
    # opening: a STATUS first, on its own, before anything else
    assert _status(messages[0]) and len(messages[0]) == 1, messages[:3]
    # one READY=1, carrying a STATUS, after the opening STATUS
    assert _index(messages, "READY=1") == [ready] and ready > 0, messages
    assert _status(messages[ready]), messages[ready]
    assert _pings_after(messages, ready + 1) >= 5
    assert taps_before_stop >= 1
    # one STOPPING=1, after READY; neither READY nor WATCHDOG after it
    stopping = _index(messages, "STOPPING=1")
    assert len(stopping) == 1 and stopping[0] > ready, messages
    after = messages[stopping[0] + 1:]
    assert not any(_has(m, "WATCHDOG=1") or _has(m, "READY=1") for m in after), after
    # every assignment is one sd_notify(3) defines: a typo would be silently ignored
    for message in messages:
        for assignment in message:
            assert assignment.split("=", 1)[0] in SD_NOTIFY_KEYS, message


def test_no_watchdog_when_it_is_meant_for_another_process(systemd: Systemd,
                                                          tmp_path: Path) -> None:
    """sd_watchdog_enabled(3): $WATCHDOG_PID names the watched process; a daemon that
    inherited it from its parent is not the one, and must not ping."""
    other = str(os.getpid())
    systemd.start(_config(tmp_path), "reader.sim_interval_s=0.2", watchdog_pid=other)
    systemd.wait_message(lambda ms: bool(_index(ms, "READY=1")), "READY=1")
    systemd.wait_log(" tapgate.tap: tap ")
    # 0.2 s between pings were it pinging: a second holds five
    systemd.receive(1.0)
    assert systemd.stop() == 0
    assert not _index(systemd.messages, "WATCHDOG=1"), systemd.messages


# --- a hung card loop ----------------------------------------------------------------------------
def test_watchdog_stops_when_the_card_loop_hangs(systemd: Systemd, tmp_path: Path) -> None:
    # the sim relay driver never returns from the second passage: the card loop hangs there
    systemd.start(_config(tmp_path), "reader.sim_interval_s=0.2", "gateio.sim_hang_after=2")
    systemd.wait_message(lambda ms: bool(_index(ms, "READY=1")), "READY=1")
    ready = _index(systemd.messages, "READY=1")[0]

    systemd.wait_log("the relay driver hangs")
    # the watchdog logs that it withholds the ping after sending its last one: every ping
    # sent before that is queued on the socket by the time the line is read
    systemd.wait_log("withholding the watchdog", timeout=START_TIMEOUT_S)
    systemd.drain()
    withheld = len(systemd.messages)
    assert _pings_after(systemd.messages, ready + 1) >= 1, "no WATCHDOG=1 before the hang"

    deadline = time.monotonic() + HANG_WINDOW_S  # 3 staleness periods, 15 ping intervals
    while (left := deadline - time.monotonic()) > 0:
        systemd.receive(left)
    late = [m for m in systemd.messages[withheld:] if _has(m, "WATCHDOG=1")]
    assert not late, f"{len(late)} WATCHDOG=1 after the card loop hung"
    # alive and hung, not dead: the silence is the watchdog's doing
    assert systemd.proc is not None and systemd.proc.poll() is None
    assert systemd.log_count(" tapgate.tap: tap ") >= 1
    systemd.proc.send_signal(signal.SIGKILL)  # what systemd's watchdog ends in
    assert systemd.wait_exit() == -signal.SIGKILL


def test_sigterm_ends_a_daemon_whose_card_loop_hangs(systemd: Systemd, tmp_path: Path) -> None:
    """A hung card loop cannot stop: after the grace period the daemon leaves as a crash
    would (the journal is built for that) with EX_SOFTWARE, before systemd's
    TimeoutStopSec, instead of hanging on until SIGKILL."""
    systemd.start(_config(tmp_path), "reader.sim_interval_s=0.2", "gateio.sim_hang_after=2")
    systemd.wait_log("the relay driver hangs")
    systemd.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert systemd.wait_exit() == 70
    systemd.drain()
    assert any(_has(m, "STOPPING=1") for m in systemd.messages)
    assert systemd.log_count("did not stop within") == 1


# --- a journal that cannot be opened ------------------------------------------------------------
def _journal_is_a_directory(tmp_path: Path) -> Path:
    path = tmp_path / "journal.db"
    path.mkdir()
    return path


def _journal_is_a_foreign_file(tmp_path: Path) -> Path:
    path = tmp_path / "journal.db"
    path.write_text("not a journal, and not to be replaced by one\n" * 100)
    return path


def _journal_under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "var").write_text("a file where the journal's directory should be")
    return tmp_path / "var" / "journal.db"


@pytest.mark.parametrize("make_journal", [_journal_is_a_directory, _journal_is_a_foreign_file,
                                          _journal_under_a_file])
def test_no_ready_when_the_journal_cannot_be_opened(systemd: Systemd, tmp_path: Path,
                                                    make_journal: Callable[[Path], Path]) -> None:
    journal = make_journal(tmp_path)
    before = journal.read_bytes() if journal.is_file() else None
    systemd.start(_config(tmp_path, journal), "reader.sim_interval_s=0.2")

    rc = systemd.wait_exit()

    assert rc != 0, "a daemon with no journal must not exit 0"
    assert not _index(systemd.messages, "READY=1"), systemd.messages
    assert not _index(systemd.messages, "WATCHDOG=1"), systemd.messages
    message = "\n".join(systemd.lines)
    assert str(journal) in message, message  # names what it could not open
    assert "Traceback" not in message, message  # a clear message, not a crash
    if before is not None:
        assert journal.read_bytes() == before  # a foreign file is refused, never replaced
