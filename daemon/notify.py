"""Telling systemd how the daemon is: sd_notify(3) and the watchdog, with no library.

The protocol is one datagram of ``KEY=value`` lines sent to the AF_UNIX socket named by
$NOTIFY_SOCKET (a path, or ``@name`` for the abstract namespace). It is written here
directly because the ``sdnotify`` package swallows every error; here a failed send is
logged once per run of failures and never raised: the gate must keep taking taps whether
or not systemd hears about it. Without $NOTIFY_SOCKET (run by hand, in tests) every call
is a no-op.

Liveness is the card loop's heartbeat, not the event loop's: :func:`run_watchdog` sends
WATCHDOG=1 only while the heartbeat is fresh, so a hung card loop (a wedged reader call,
a stuck fsync) stops the pings and systemd kills and restarts the service after
WatchdogSec.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from hal.reader.base import ReaderState

log = logging.getLogger("tapgate.notify")

SEND_TIMEOUT_S = 1.0  # systemd reads its notify socket promptly; never block the loop long
# How old the card loop's heartbeat may be before the watchdog is withheld. The loop beats
# every reader wait slice (0.25 s) when idle; a tap, with its journal fsync, takes
# milliseconds; a stuck PC/SC call or a hung relay driver stops it.
DEFAULT_MAX_STALENESS_S = 20.0


class Notifier:
    """Sends sd_notify messages to systemd; a no-op when there is no notify socket."""

    def __init__(self, *, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = _socket_address(address) if address else None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # the card loop's thread may report status too
        self._failing = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, pid: int | None = None) -> Notifier:
        """Read $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID as systemd set them."""
        env = os.environ if env is None else env
        return cls(address=env.get("NOTIFY_SOCKET") or None,
                   watchdog_usec=_watchdog_usec(env, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """WatchdogSec in seconds if systemd expects pings from this process, else None.

        sd_watchdog_enabled(3): $WATCHDOG_USEC must be a positive integer, and when
        $WATCHDOG_PID is set it must be this process (a child that inherited the
        environment is not the one being watched).
        """
        return None if self._watchdog_usec is None else self._watchdog_usec / 1_000_000

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *(() if status is None else (_status(status),)))

    def status(self, text: str) -> bool:
        return self.send(_status(text))

    def observe_reader(self, name: str, state: ReaderState) -> None:
        """A ReaderListener (daemon.loop): shown by ``systemctl status``."""
        self.status(f"reader {name}: {state.value}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def send(self, *assignments: str) -> bool:
        """Send one datagram; True if it left. Failures are logged, never raised."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(SEND_TIMEOUT_S)
                # sendto rather than connect: the address is looked up again on every send,
                # so a systemd that re-executed (daemon-reexec) is still found.
                self._sock.sendto(payload, self._address)
            except OSError as err:
                if not self._failing:
                    log.warning("cannot notify systemd at %s: %s (further failures not logged)",
                                _printable(self._address), err)
                    self._failing = True
                return False
            if self._failing:
                log.info("notifying systemd again")
                self._failing = False
            return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class LivenessWatchdog:
    """Pings the systemd watchdog only while the card loop's heartbeat is fresh."""

    def __init__(self, notifier: Notifier, heartbeat: Callable[[], float], *,
                 max_staleness_s: float = DEFAULT_MAX_STALENESS_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._notifier = notifier
        self._heartbeat = heartbeat
        self._max_staleness_s = max_staleness_s
        self._clock = clock
        self._withholding = False

    def tick(self) -> bool:
        """Send WATCHDOG=1 if the heartbeat is fresh; True if the loop was found alive."""
        age = self._clock() - self._heartbeat()
        if age > self._max_staleness_s:
            if not self._withholding:
                log.error("card loop silent for %.1f s: withholding the watchdog, "
                          "systemd will restart the service", age)
                self._withholding = True
            return False
        if self._withholding:
            log.warning("card loop alive again: watchdog pings resumed")
            self._withholding = False
        self._notifier.watchdog()
        return True


async def run_watchdog(notifier: Notifier, heartbeat: Callable[[], float], stop: asyncio.Event,
                       *, max_staleness_s: float = DEFAULT_MAX_STALENESS_S) -> None:
    """Ping at half the watchdog interval while the heartbeat is fresh, until ``stop``.

    With no watchdog configured it just waits for ``stop``, so that a supervisor does not
    take its return for a failure.
    """
    interval = notifier.watchdog_interval()
    if interval is None or not notifier.enabled:
        await stop.wait()
        return
    watchdog = LivenessWatchdog(notifier, heartbeat, max_staleness_s=max_staleness_s)
    while not stop.is_set():
        watchdog.tick()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval / 2)


# --- helpers -------------------------------------------------------------------------------
def _socket_address(address: str) -> str | bytes | None:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()  # abstract namespace: a leading NUL, no file
    if address.startswith("/"):
        return address
    log.warning("ignoring NOTIFY_SOCKET=%r: neither a path nor an @abstract name", address)
    return None


def _printable(address: str | bytes) -> str:
    return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) else address


def _status(text: str) -> str:
    # One assignment per line: a newline in the text would start a bogus one.
    return "STATUS=" + " ".join(text.splitlines())


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    if not usec_text.isascii() or not usec_text.isdigit() or int(usec_text) == 0:
        log.warning("ignoring WATCHDOG_USEC=%r: not a positive number of microseconds",
                    usec_text)
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        if not pid_text.isascii() or not pid_text.isdigit():
            log.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a pid", pid_text)
            return None
        if int(pid_text) != pid:
            return None  # meant for another process (we inherited its environment)
    return int(usec_text)
