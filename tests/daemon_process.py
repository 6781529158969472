"""The real daemon as a subprocess: `python -m daemon.cli run` of this checkout, its log
lines (stderr) collected as they come, for the tests that run the whole gate.

Every :class:`Daemon` started is kept in a registry; tests/conftest.py registers this
module as a plugin, and its autouse fixture kills whatever a test left running: a failed
test must not leave a daemon behind taking taps from a shared reader or publishing to
the shared broker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.waiting import TIMEOUT_S

ROOT = Path(__file__).resolve().parent.parent
TAP = " tapgate.tap: tap "  # the log line of every tap, whatever its outcome
RUNNING = "tapgate running"  # the card loop takes taps from here on
# not inherited from the test's own environment (nor TAPGATE_*, which would override the
# config): were pytest run by a service manager, the daemon would notify it, or log to
# journald instead of to the pipe the test reads
_NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")

_STARTED: list[Daemon] = []


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TAPGATE_") and k not in _NOT_INHERITED}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


class Daemon:
    """`tapgate run --config config [--set override]...` as a subprocess.

    ``env``: added to the environment (e.g. NOTIFY_SOCKET, which is otherwise not
    passed on); ``prefix``: argv put before the interpreter (a shell that sets
    something up and execs it).
    """

    def __init__(self, config: Path, *overrides: str, env: Mapping[str, str] | None = None,
                 prefix: Sequence[str] = ()) -> None:
        argv = [*prefix, sys.executable, "-m", "daemon.cli", "run", "--config", str(config)]
        for override in overrides:
            argv += ["--set", override]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=_env(env), text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        _STARTED.append(self)

    def _collect(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    # -- its log ----------------------------------------------------------------------------
    def count(self, text: str) -> int:
        with self._cond:
            return sum(text in line for line in self.lines)

    def taps(self) -> int:
        return self.count(TAP)

    def until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds (it is called holding the log's lock), the
        log has ended with the process, or ``timeout`` has passed; whether it holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            # short waits: a kill switch firing or the process dying notifies nobody
            while (not predicate() and time.monotonic() < deadline
                   and (self.proc.poll() is None or self._reader.is_alive())):
                self._cond.wait(0.02)
            return predicate()

    def wait_for(self, predicate: Callable[[], bool], what: str,
                 timeout: float = TIMEOUT_S) -> None:
        if not self.until(predicate, timeout):
            pytest.fail(f"{what} did not happen; {self.tail()}")

    def wait_log(self, text: str, n: int = 1, timeout: float = TIMEOUT_S) -> None:
        self.wait_for(lambda: self.count(text) >= n, f"{n} x {text!r}", timeout)

    def wait_ready(self, timeout: float = TIMEOUT_S) -> None:
        self.wait_for(lambda: self.count(RUNNING) > 0, "start", timeout)

    def wait_taps(self, count: int, timeout: float = TIMEOUT_S) -> None:
        self.wait_for(lambda: self.taps() >= count, f"tap {count}", timeout)

    def tail(self, n: int = 30) -> str:
        with self._cond:
            lines = "\n".join(self.lines[-n:])
        return f"daemon rc={self.proc.poll()}; its log ends:\n{lines}"

    # -- its end ----------------------------------------------------------------------------
    def stop(self, timeout: float = TIMEOUT_S) -> int:
        """SIGTERM, and its exit status once it has exited."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self, timeout: float = TIMEOUT_S) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait_exit(timeout)

    def wait_exit(self, timeout: float = TIMEOUT_S) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test() -> Iterator[None]:
    yield
    while _STARTED:
        _STARTED.pop().kill()
