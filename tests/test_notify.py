"""sd_notify and the liveness watchdog against a real AF_UNIX datagram socket, the way
systemd listens on $NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.notify import LivenessWatchdog, Notifier, run_watchdog

TIMEOUT_S = 10.0  # generous: only a broken implementation should ever get near it


@pytest.fixture
def notify_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="tg-notify-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def listener(notify_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """systemd's side: a datagram socket bound to a path, and that path."""
    path = str(notify_dir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(TIMEOUT_S)
    yield sock, path
    sock.close()


def _pending(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued, without waiting."""
    out = []
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(timeout)


# --- the messages ------------------------------------------------------------------------
def test_ready_status_watchdog_stopping_arrive(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled

    assert notifier.ready("taking taps")
    assert sock.recv(4096) == b"READY=1\nSTATUS=taking taps"
    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"
    assert notifier.status("reader ACS ACR122U\nabsent")
    assert sock.recv(4096) == b"STATUS=reader ACS ACR122U absent"  # one line, one assignment
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    notifier.close()


def test_abstract_namespace_socket() -> None:
    name = f"tapgate-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(TIMEOUT_S)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("abstract")
        assert sock.recv(4096) == b"READY=1\nSTATUS=abstract"
        notifier.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    assert not notifier.ready("x")
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    notifier.close()


def test_from_env_reads_the_process_environment(
        listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_env()
    assert notifier.watchdog_interval() == 2.0
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_unusable_notify_socket_values_disable_notification(
        caplog: pytest.LogCaptureFixture) -> None:
    assert not Notifier.from_env({"NOTIFY_SOCKET": ""}).enabled
    with caplog.at_level(logging.WARNING, logger="tapgate.notify"):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "relative/notify"})
    assert not notifier.enabled
    assert "NOTIFY_SOCKET" in caplog.text


def test_send_failures_are_logged_once_and_never_raised(
        notify_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(notify_dir / "notify")  # nobody listens here yet
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    with caplog.at_level(logging.INFO, logger="tapgate.notify"):
        assert not notifier.ready("starting")
        assert not notifier.watchdog()
        assert not notifier.status("still nobody")
        failures = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(failures) == 1
        assert path in failures[0].getMessage()

        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:  # systemd is back
            sock.bind(path)
            sock.settimeout(TIMEOUT_S)
            assert notifier.watchdog()
            assert sock.recv(4096) == b"WATCHDOG=1"
        assert "notifying systemd again" in caplog.text

        assert not notifier.watchdog()  # gone again: a new run of failures, logged again
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    notifier.close()


# --- sd_watchdog_enabled -------------------------------------------------------------------
@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "10000000"}, 10.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "4242"}, 10.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "4243"}, None),  # another process's
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "10s"}, None),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "self"}, None),
])
def test_watchdog_interval_follows_sd_watchdog_enabled(
        env: dict[str, str], expected: float | None) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", **env}, pid=4242)
    assert notifier.watchdog_interval() == expected


# --- liveness ----------------------------------------------------------------------------
class Heartbeat:
    """The card loop's heartbeat as the test sets it; counts how often it was read, which
    is how often the watchdog looked."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.at

    def beat(self) -> None:
        self.at = time.monotonic()

    def hang(self) -> None:
        self.at = time.monotonic() - 3600.0


def test_tick_pings_only_while_the_heartbeat_is_fresh(
        listener: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture) -> None:
    sock, path = listener
    now = [100.0]
    heartbeat = Heartbeat()
    heartbeat.at = 100.0
    watchdog = LivenessWatchdog(Notifier.from_env({"NOTIFY_SOCKET": path}), heartbeat,
                                max_staleness_s=5.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="tapgate.notify"):
        assert watchdog.tick()
        now[0] = 105.0  # exactly at the limit: still alive
        assert watchdog.tick()
        assert _pending(sock) == [b"WATCHDOG=1", b"WATCHDOG=1"]

        now[0] = 105.5
        assert not watchdog.tick()
        assert not watchdog.tick()
        assert _pending(sock) == []
        withheld = [r for r in caplog.records if "withholding" in r.getMessage()]
        assert len(withheld) == 1  # once per episode, not once per tick

        heartbeat.at = 105.5
        assert watchdog.tick()
        assert _pending(sock) == [b"WATCHDOG=1"]
        assert "pings resumed" in caplog.text


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def test_run_watchdog_stops_pinging_a_hung_loop_and_resumes(
        listener: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture) -> None:
    sock, path = listener
    # WatchdogSec=0.1 s: a ping every 50 ms. Freshness is decided by the test (beat/hang),
    # never by how fast this machine runs, so the staleness limit is generous.
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    heartbeat = Heartbeat()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        stop = asyncio.Event()
        task = asyncio.create_task(run_watchdog(notifier, heartbeat, stop, max_staleness_s=60.0))

        async def receive() -> bytes:
            return await asyncio.wait_for(loop.sock_recv(sock, 4096), TIMEOUT_S)

        # alive: pings keep coming
        for _ in range(3):
            assert await receive() == b"WATCHDOG=1"

        # hung: once the watchdog has looked at the stale heartbeat, nothing more is sent
        heartbeat.hang()
        looked = heartbeat.reads
        await _until(lambda: heartbeat.reads > looked, "the watchdog to see the hang")
        _pending(sock)  # pings sent before the hang was seen
        looked = heartbeat.reads
        await _until(lambda: heartbeat.reads >= looked + 3, "three more watchdog looks")
        assert _pending(sock) == []
        assert "withholding the watchdog" in caplog.text

        # alive again: pings resume
        heartbeat.beat()
        assert await receive() == b"WATCHDOG=1"
        assert "pings resumed" in caplog.text

        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)

    with caplog.at_level(logging.INFO, logger="tapgate.notify"):
        asyncio.run(scenario())
    withheld = [r for r in caplog.records if "withholding" in r.getMessage()]
    assert len(withheld) == 1
    notifier.close()


def test_run_watchdog_without_a_watchdog_just_waits_for_stop(
        listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})  # no WATCHDOG_USEC
    heartbeat = Heartbeat()

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_watchdog(notifier, heartbeat, stop))
        for _ in range(20):
            await asyncio.sleep(0)
        # returning early would make the supervisor restart it as a failed task
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, TIMEOUT_S)

    asyncio.run(scenario())
    assert heartbeat.reads == 0
    assert _pending(sock) == []
