"""What the head-end tests share: `tapgate-headend run` as a separate process
(:class:`Headend`), the fixtures that start it and make the broker, the key files and the
gates it serves, and readers of its database.

tests/conftest.py registers this module as a plugin: its fixtures serve test_headend.py,
test_headend_verdicts.py, test_headend_forgery.py and test_headend_cli.py.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cards import MASTER_TAC_KEY
from tests.fixtures.mosquitto import Mosquitto
from tests.gate_stub import GateStub, SignedGate

ROOT = Path(__file__).resolve().parent.parent
HEADEND = [sys.executable, "-m", "headend.cli"]
READY = "ready: subscribed"


def env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TAPGATE_")}
    clean["PYTHONUNBUFFERED"] = "1"
    clean.update(extra)
    return clean


def headend(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HEADEND, *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, check=False, **kw)


class Headend:
    """One `tapgate-headend run` process."""

    def __init__(self, directory: Path, broker: Mosquitto, db: Path, *, name: str,
                 args: tuple[str, ...] = ()) -> None:
        self.name = name
        self.db = db
        self.log_path = directory / f"{name}.log"
        self.argv = [*HEADEND, "run", "--broker", f"{broker.host}:{broker.port}",
                     "--db", f"sqlite:///{db}", "--client-id", name, *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> Headend:
        with self.log_path.open("ab") as log:
            log.write(b"--- start\n")
            self.proc = subprocess.Popen([*self.argv, *extra], cwd=ROOT, env=env(),
                                         stdout=log, stderr=subprocess.STDOUT)
        starts = self.log().count("--- start")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.log().split("--- start")[starts].count(READY):
                return self
            if self.proc.poll() is not None:
                pytest.fail(f"head-end {self.name} exited: {self.log()}", pytrace=False)
            time.sleep(0.05)
        pytest.fail(f"head-end {self.name} did not subscribe: {self.log()}", pytrace=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop it as systemd would; it must exit 0, having said so."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(20)
        assert code == 0, f"head-end {self.name} exited {code}: {self.log()}"
        assert "stopped:" in self.log()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def broker(make_broker: Callable[..., Mosquitto]) -> Mosquitto:
    """A broker of the test's own: nothing another test's gates resend can reach it."""
    return make_broker()


@pytest.fixture
def stubs(broker: Mosquitto) -> Iterator[Callable[..., GateStub]]:
    made: list[GateStub] = []

    def make(gate: str, **kw: Any) -> GateStub:
        stub = GateStub(broker.host, broker.port, gate, **kw)
        made.append(stub)
        return stub

    yield make
    for stub in made:
        stub.close()


@pytest.fixture
def keyfiles(tmp_path: Path) -> Callable[..., tuple[str, ...]]:
    """``keyfiles(*gates)``: the run options for the TAC key and these gates' keys."""

    def make(*gates: SignedGate) -> tuple[str, ...]:
        tac = tmp_path / "tac.key"
        tac.write_text(MASTER_TAC_KEY.hex().upper() + "\n")
        tac.chmod(0o600)
        gate_keys = tmp_path / "gates.toml"
        gate_keys.write_text("".join(f'{g.gate} = "{g.public_hex}"\n' for g in gates))
        return ("--tac-key-file", str(tac), "--gate-keys", str(gate_keys))

    return make


@pytest.fixture
def run_headend(tmp_path: Path, broker: Mosquitto) -> Iterator[Callable[..., Headend]]:
    started: list[Headend] = []

    def start(*args: str, name: str = "h1", db: Path | None = None,
              first: tuple[str, ...] = ()) -> Headend:
        """Start a head-end with ``args``; ``first``: options for its first start only."""
        h = Headend(tmp_path, broker, db or tmp_path / "headend.db", name=name, args=args)
        started.append(h)
        return h.start(*first)

    yield start
    for h in started:
        h.kill()


@pytest.fixture
def gates(tmp_path: Path) -> Iterator[Callable[..., SignedGate]]:
    made: list[SignedGate] = []

    def make(terminal_id: str = "000000A00001", taps: int = 20) -> SignedGate:
        gate = SignedGate(tmp_path / f"gate-{terminal_id}", bytes.fromhex(terminal_id))
        gate.ride(taps)
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.close()


def rows(db: Path, sql: str = "SELECT * FROM entry ORDER BY gate, entry_id") -> list[
        dict[str, Any]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def verified_rows(db: Path, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The stored entries once none awaits its hash, signature and TAC verdicts: the
    verifying processes check them after the ack."""
    deadline = time.monotonic() + timeout
    while True:
        stored = rows(db)
        if all(r["hash_state"] != "pending" for r in stored):
            return stored
        assert time.monotonic() < deadline, "verdicts still pending"
        time.sleep(0.05)


def uuids_of(entries: list[dict[str, Any]]) -> list[str]:
    return [str(e["uuid"]) for e in entries]
