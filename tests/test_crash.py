"""The daemon SIGKILLed over and over while taps run, through the real pcscd + vpcd.

The cards live in this test process (on the vpcd reader), so they outlive every daemon
that is killed. A kill lands at a chosen point of the card exchange (just before or
just after the card acts on SELECT, INITIALIZE, DEBIT, READ RECORD or GET TRANSACTION
PROOF), or at a random moment after a tap. After each restart: no intent is lost (the
interrupted ones became tears), the tears still pending before the kill are still
pending, and the journal's chain is intact. At the end every card is tapped until
nothing is pending, and the ledger must balance: for every card, the debits it made
equal the debits the journal recognises, none twice, none missing.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.journal import Journal
from hal.card.model import CardTorn, Fault, FaultKind, VirtualPurse
from hal.card.vpcd import VpcdCard
from tests.cards import (
    INS_DEBIT,
    INS_INITIALIZE,
    INS_PROOF,
    INS_READ_RECORD,
    INS_SELECT,
    TERMINAL_ID,
    make_card,
)
from tests.configs import raw_config, toml_text
from tests.daemon_process import Daemon
from tests.fixtures.pcsc import VPCD_PORT, Pcscd
from tests.ledger import assert_ledger, journal_problems

pytestmark = [pytest.mark.pcsc, pytest.mark.slow]

# vpcd's second slot: this test has a reader of its own, whatever else uses the first
READER = "Virtual PCD 00 01"
PORT = VPCD_PORT + 1

KILLS = int(os.environ.get("TAPGATE_CRASH_KILLS", "100"))
# pcscd polls vpcd for presence every 400 ms: a card taken away and put back (or another
# card put down) quicker than that is never seen to leave, so passengers leave a gap.
REMOVAL_GAP_S = 0.5
KILL_POINTS = [INS_SELECT, INS_INITIALIZE, INS_DEBIT, INS_READ_RECORD, INS_PROOF]
TAP_TIMEOUT_S = 30.0


class KillSwitch:
    """Stands between vpcd and a card: SIGKILLs the daemon when the card sees a chosen
    command, before or after acting on it (as if the gate lost power right then)."""

    def __init__(self, card: VirtualPurse) -> None:
        self.card = card
        self.pid: int | None = None
        self.ins: int | None = None
        self.after = False
        self.fired = threading.Event()

    # what VpcdCard uses of a card
    @property
    def serial(self) -> bytes:
        return self.card.serial

    @property
    def atr(self) -> bytes:
        return self.card.atr

    def power_on(self) -> None:
        self.card.power_on()

    def arm(self, pid: int, ins: int, after: bool) -> None:
        self.pid, self.ins, self.after = pid, ins, after
        self.fired.clear()

    def disarm(self) -> None:
        self.ins = None

    def process(self, apdu: bytes) -> bytes:
        if self.ins is None or len(apdu) < 2 or apdu[1] != self.ins:
            return self.card.process(apdu)
        self.ins = None
        if not self.after:
            self._kill()
            raise CardTorn(applied=False)  # the field dies with the gate
        answer = self.card.process(apdu)
        self._kill()
        return answer

    def _kill(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        self.fired.set()


@pytest.fixture
def crash_config(tmp_path: Path) -> Path:
    raw = raw_config(tmp_path / "journal.db")
    raw["gate"]["anti_passback_s"] = 0
    raw["reader"] = {"backend": "pcsc", "name": READER, "poll_s": 0.05}
    path = tmp_path / "tapgate.toml"
    path.write_text(toml_text(raw), encoding="utf-8")
    return path


@pytest.fixture
def switches(pcscd: Pcscd) -> Iterator[list[tuple[KillSwitch, VpcdCard]]]:
    del pcscd
    rng = random.Random(7)
    cards = [make_card(n, balance=rng.randrange(5_000, 50_000)) for n in range(1, 9)]
    pairs = []
    for card in cards:
        switch = KillSwitch(card)
        pairs.append((switch, VpcdCard(card=switch, port=PORT)))  # type: ignore[arg-type]
    yield pairs
    for _, vpcd in pairs:
        vpcd.close()


def _journal_state(path: Path) -> tuple[set[int], list[int]]:
    """(ids of pending tears, ids of intents with no outcome) as on disk now."""
    with Journal(path) as journal:
        pending = {e.id for e in journal.pending_recoveries()}
        dangling = [e.id for e in journal.dangling_intents()]
        problems = journal_problems(journal, dangling_ok=True)
    assert not problems, problems
    return pending, dangling


def _killed_or_tapped(switch: KillSwitch, daemon: Daemon, seen: int) -> Callable[[], bool]:
    return lambda: switch.fired.is_set() or daemon.taps() > seen


def _tap(daemon: Daemon, vpcd: VpcdCard) -> None:
    """Present the card until the daemon logged its tap, then take it away."""
    seen = daemon.taps()
    vpcd.insert()
    daemon.wait_taps(seen + 1, TAP_TIMEOUT_S)
    vpcd.remove()
    time.sleep(REMOVAL_GAP_S)


def test_sigkill_at_random_points_loses_nothing(crash_config: Path,
                                                switches: list[tuple[KillSwitch, VpcdCard]]
                                                ) -> None:
    rng = random.Random(20261122)
    journal_path = crash_config.parent / "journal.db"
    kills = {"exchange": 0, "random": 0}
    pending_before: set[int] = set()
    for _ in range(KILLS):
        daemon = Daemon(crash_config)
        daemon.wait_ready()
        if journal_path.exists():
            # after a restart no intent is left without an outcome, and every tear that
            # was pending when the last daemon died is pending still
            pending_after, dangling = _journal_state(journal_path)
            assert dangling == []
            assert pending_before <= pending_after
        for _ in range(rng.randrange(0, 3)):  # some ordinary taps, some torn
            switch, vpcd = rng.choice(switches)
            if rng.random() < 0.3:
                switch.card.inject(Fault(rng.choice(list(FaultKind)[:2]), ins=INS_DEBIT))
            _tap(daemon, vpcd)
        switch, vpcd = rng.choice(switches)
        if rng.random() < 0.75:
            switch.arm(daemon.proc.pid, rng.choice(KILL_POINTS), after=rng.random() < 0.5)
            seen = daemon.taps()
            vpcd.insert()
            # a kill point the tap never reaches (no pending tear: no READ RECORD) lets
            # the tap finish; then the kill comes right after it
            daemon.wait_for(_killed_or_tapped(switch, daemon, seen), "kill or tap",
                            TAP_TIMEOUT_S)
            switch.disarm()
            kills["exchange" if switch.fired.is_set() else "random"] += 1
        else:
            vpcd.insert()
            time.sleep(rng.uniform(0, 0.6))  # anywhere: detection, the tap, the journal
            kills["random"] += 1
        daemon.kill()
        vpcd.remove()
        time.sleep(REMOVAL_GAP_S)
        pending_before, _ = _journal_state(journal_path)

    # settle everything: tap each card until nothing of it is pending
    daemon = Daemon(crash_config)
    daemon.wait_ready()
    for switch, vpcd in switches:
        for _ in range(5):
            with Journal(journal_path) as journal:
                if not journal.pending_recoveries(switch.serial):
                    break
            _tap(daemon, vpcd)
    assert daemon.stop() == 0
    print(f"kills inside the card exchange: {kills['exchange']}, "
          f"elsewhere: {kills['random']}")

    with Journal(journal_path) as journal:
        assert journal.pending_recoveries() == []
        assert journal_problems(journal) == []
        assert journal.verify().ok
        ledger = assert_ledger([s.card for s, _ in switches], journal, terminal_id=TERMINAL_ID)
    assert ledger.card, "no debit happened at all: the test exercised nothing"
    assert kills["exchange"] > KILLS // 3
