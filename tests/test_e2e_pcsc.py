"""The card loop end to end on the real PC/SC stack: pcscd with vsmartcard's vpcd reader,
the real :class:`PcscReader` (pyscard), the project's virtual TGP1 cards on vpcd, and the
real tap processor, SQLite journal, software SAM and sim gate.

Every test runs twice: once calling ``TapProcessor.handle`` on the link the reader hands
out (``direct``), once with the daemon's :class:`CardLoop` running in its own thread and
the test collecting what its tap listener reports (``loop``).

Time is a test :class:`Clock` shared by the processor, the journal and the cards; nothing
asserts on wall-clock time, and every wait is bounded by a generous deadline.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.journal import Journal
from daemon.loop import CardLoop
from daemon.outcome import Outcome, TapResult
from daemon.tap import TapProcessor
from hal.card.model import Fault, FaultKind, VirtualPurse
from hal.card.vpcd import VpcdCard
from hal.gate.base import Signal
from hal.gate.sim import SimGateIO
from hal.reader.base import CardLink, ReaderState
from hal.sam.software import SoftwareSam
from protocol.entry import Entry
from tests.cards import (
    ADULT,
    FARES,
    INS_DEBIT,
    INS_INITIALIZE,
    INS_PROOF,
    INS_READ_RECORD,
    INS_SELECT,
    MASTER_KEY,
    Clock,
    make_card,
)
from tests.configs import gate_config
from tests.fixtures.pcsc import VPCD_PORT, VPCD_READER, Pcscd
from tests.ledger import assert_ledger, journal_problems, states
from tests.rig import TracingLink

pytest.importorskip("smartcard", reason="pyscard is not installed")
from smartcard import scard

from hal.reader.pcsc import PcscReader

pytestmark = pytest.mark.pcsc

DEADLINE_S = 60.0  # the most any one step may take on a busy shared machine
# vpcd gives pcscd two readers: these tests use the first ("Virtual PCD 00 00", port 35963;
# tests/test_crash.py has the second). TAPGATE_VPCD_SLOT=1 moves them to the second.
SLOT = int(os.environ.get("TAPGATE_VPCD_SLOT", "0"))
READER = VPCD_READER if SLOT == 0 else f"Virtual PCD 00 {SLOT:02d}"
PORT = VPCD_PORT + SLOT
FARE = FARES[ADULT]
SELECT_INIT_DEBIT = [INS_SELECT, INS_INITIALIZE, INS_DEBIT]


# --- the gate under test ---------------------------------------------------------------
class TracingReader:
    """The real PcscReader, with every link it hands out recording the commands sent."""

    def __init__(self, reader: PcscReader) -> None:
        self.pcsc = reader
        self.sent: list[bytes] = []

    @property
    def name(self) -> str:
        return self.pcsc.name

    @property
    def state(self) -> ReaderState:
        return self.pcsc.state

    def open(self) -> None:
        self.pcsc.open()

    def wait_for_card(self, timeout: float) -> CardLink | None:
        link = self.pcsc.wait_for_card(timeout)
        if link is None:
            return None
        self.sent = []
        return TracingLink(link, self.sent, {}, {})

    def wait_for_removal(self, timeout: float) -> bool:
        return self.pcsc.wait_for_removal(timeout)

    def close(self) -> None:
        self.pcsc.close()


def wait_field_empty(timeout: float = DEADLINE_S) -> None:
    """Block until pcscd reports no card on the vpcd reader, on a PC/SC context of the
    test's own (the card loop's thread owns the reader's)."""
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hresult & 0xFFFFFFFF == scard.SCARD_S_SUCCESS, "pcscd does not answer"
    try:
        known = scard.SCARD_STATE_UNAWARE
        deadline = time.monotonic() + timeout
        while True:
            hresult, found = scard.SCardGetStatusChange(context, 1000, [(READER, known)])
            code = hresult & 0xFFFFFFFF
            if code == scard.SCARD_S_SUCCESS:
                known = found[0][1] & ~scard.SCARD_STATE_CHANGED
                if not known & scard.SCARD_STATE_PRESENT:
                    return
            else:
                assert code == scard.SCARD_E_TIMEOUT, f"PC/SC error 0x{code:08X}"
            assert time.monotonic() < deadline, f"the card still in the field after {timeout} s"
    finally:
        scard.SCardReleaseContext(context)


class E2EGate:
    """One gate on the real PC/SC stack, driven ``direct`` or through the ``loop``."""

    def __init__(self, directory: Path, mode: str) -> None:
        self.mode = mode
        self.clock = Clock()
        self.config = gate_config()
        self.journal = Journal(directory / "journal.db", clock=self.clock).open()
        self.sam = SoftwareSam(purchase_key=MASTER_KEY)
        self.gate = SimGateIO()
        self.processor = TapProcessor(gate_config=self.config, journal=self.journal,
                                      sam=self.sam, gate=self.gate, clock=self.clock,
                                      monotonic=self.clock.monotonic)
        self.reader = TracingReader(PcscReader(name=READER, poll_s=0.1))
        self._results: queue.Queue[TapResult] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._crash: list[BaseException] = []
        self.loop: CardLoop | None = None
        if mode == "direct":
            self.reader.open()
        else:
            self._start_loop()

    # -- the card loop thread -----------------------------------------------------------
    def _start_loop(self) -> None:
        self.loop = CardLoop(reader=self.reader, processor=self.processor,
                             listeners=[lambda result, _seconds: self._results.put(result)])
        loop = self.loop

        def run() -> None:
            try:
                loop.run(self._stop)
            except BaseException as err:  # reported to the test waiting for a tap
                self._crash.append(err)
                raise

        self._thread = threading.Thread(target=run, name="card-loop", daemon=True)
        self._thread.start()
        assert loop.ready.wait(DEADLINE_S), "the card loop did not get ready"

    def _loop_result(self) -> TapResult:
        waited = 0.0
        while waited < DEADLINE_S:
            try:
                return self._results.get(timeout=0.5)
            except queue.Empty:
                waited += 0.5
                assert not self._crash, f"the card loop died: {self._crash[0]!r}"
        raise AssertionError(f"the card loop reported no tap within {DEADLINE_S:.0f} s")

    # -- what the tests call ---------------------------------------------------------------
    def tap(self, vpcd: VpcdCard) -> TapResult:
        """Put the card on the reader, let the gate handle it, take it away again (and
        wait until pcscd has seen it go, so that the next presentation is a new one)."""
        vpcd.insert(timeout=DEADLINE_S)
        if self.mode == "direct":
            link = self.reader.wait_for_card(DEADLINE_S)
            assert link is not None, f"no card handed out within {DEADLINE_S:.0f} s"
            try:
                result = self.processor.handle(link)
            finally:
                link.release()
        else:
            result = self._loop_result()
        vpcd.remove()
        if self.mode == "direct":
            assert self.reader.wait_for_removal(DEADLINE_S), "the card never left the field"
        else:
            wait_field_empty()
        return result

    @property
    def commands(self) -> list[int]:
        """The INS bytes of the latest tap's commands, in order."""
        return [c[1] for c in self.reader.sent]

    def entries(self, after: int = 0) -> list[Entry]:
        return list(self.journal.entries(after_id=after))

    def signals(self) -> list[Signal | None]:
        return [e.signal for e in self.gate.events if e.what == "show"]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=DEADLINE_S)
            assert not self._thread.is_alive(), "the card loop did not stop"
        self.reader.close()
        self.journal.close()
        assert not self._crash, f"the card loop died: {self._crash[0]!r}"


LOCK_WAIT_S = 900.0  # bench.tap_latency holds the reader for minutes


@pytest.fixture
def reader_lock() -> Iterator[None]:
    """The vpcd reader to ourselves among the programs that take this lock (these tests,
    bench.tap_latency): two of them putting cards on one reader would tap each other's
    cards (a gate handles whatever card is in its field)."""
    path = Path("/tmp") / f"tapgate-vpcd-{PORT}.lock"
    with path.open("a") as fh:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{path} held for {LOCK_WAIT_S:.0f} s"
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(params=["direct", "loop"])
def gate(request: pytest.FixtureRequest, pcscd: Pcscd, reader_lock: None,
         tmp_path: Path) -> Iterator[E2EGate]:
    del pcscd, reader_lock  # running, with the vpcd reader; ours alone
    e2e = E2EGate(tmp_path, request.param)
    try:
        yield e2e
    finally:
        e2e.close()


@pytest.fixture
def present(gate: E2EGate,
            vpcd_card: Callable[..., VpcdCard]) -> Callable[[VirtualPurse], VpcdCard]:
    """A TGP1 card → the same card on the vpcd reader under test, not yet inserted."""

    def make(card: VirtualPurse) -> VpcdCard:
        return vpcd_card(card, port=PORT)

    return make


def card(gate: E2EGate, serial: int, balance: int = 5000, *, status: int = 0x00,
         expiry: dt.date = dt.date(2030, 12, 31)) -> VirtualPurse:
    """A TGP1 card whose idea of today is the gate's clock."""
    return make_card(serial, balance, status=status, expiry=expiry, clock=gate.clock)


def assert_debited_once(gate: E2EGate, purse: VirtualPurse, balance_before: int) -> None:
    """Exactly one debit of the fare on the card at this gate, the journal agreeing."""
    assert purse.balance == balance_before - FARE
    assert purse.counter == 1
    assert len(purse.history) == 1
    assert gate.gate.passages == 1
    assert_ledger([purse], gate.journal)
    assert journal_problems(gate.journal) == []


# --- the usual taps --------------------------------------------------------------------
def test_normal_tap(gate: E2EGate, present: Callable[[VirtualPurse], VpcdCard]) -> None:
    purse = card(gate, 1, 5000)
    result = gate.tap(present(purse))

    assert result.outcome is Outcome.ACCEPTED and result.opened and not result.torn
    assert (result.serial, result.amount, result.balance) == (purse.serial, FARE, 5000 - FARE)
    assert purse.balance == 5000 - FARE and purse.counter == 1
    assert gate.commands == SELECT_INIT_DEBIT
    assert gate.gate.passages == 1
    assert gate.signals() == [Signal.ACCEPT]

    intent, done = gate.entries()
    assert states([intent, done]) == ["debit/intent", "debit/completed"]
    assert done.ref == intent.id and result.entry_id == done.id
    [rec] = purse.history
    assert (done.balance_before, done.balance_after, done.card_counter) == (5000, 5000 - FARE, 0)
    assert (done.terminal_seq, done.mac2, done.tac) == (rec.terminal_seq, rec.mac2, rec.tac)
    assert (done.tx_date, done.tx_time) == ("20260504", "080000")  # the test clock's
    assert_debited_once(gate, purse, 5000)


def test_several_cards_one_after_another(
        gate: E2EGate, present: Callable[[VirtualPurse], VpcdCard]) -> None:
    purses = [card(gate, n, 1000 * n) for n in range(1, 6)]
    for n, purse in enumerate(purses, start=1):
        result = gate.tap(present(purse))
        assert result.outcome is Outcome.ACCEPTED, result
        assert (result.serial, result.balance) == (purse.serial, 1000 * n - FARE)
        assert gate.commands == SELECT_INIT_DEBIT
    assert [p.balance for p in purses] == [1000 * n - FARE for n in range(1, 6)]
    assert [p.history[0].terminal_seq for p in purses] == [1, 2, 3, 4, 5]
    assert gate.gate.passages == 5
    completed = [e for e in gate.entries() if (e.kind, e.state) == ("debit", "completed")]
    assert [e.tac for e in completed] == [p.history[0].tac for p in purses]
    assert_ledger(purses, gate.journal)
    assert journal_problems(gate.journal) == []


# --- refusals --------------------------------------------------------------------------
def assert_refused(gate: E2EGate, purse: VirtualPurse, result: TapResult, reason: str,
                   balance: int) -> None:
    assert (result.outcome, result.reason, result.serial) == (Outcome.REFUSED, reason,
                                                               purse.serial)
    assert purse.balance == balance and purse.history == [] and purse.counter == 0
    assert INS_DEBIT not in gate.commands
    assert gate.gate.passages == 0
    assert gate.signals() == [Signal.DENY]
    [entry] = gate.entries()
    assert (entry.kind, entry.state, entry.reason) == ("refusal", "refused", reason)
    assert entry.card_serial == purse.serial and result.entry_id == entry.id
    assert_ledger([purse], gate.journal)
    assert journal_problems(gate.journal) == []


def test_insufficient_balance(gate: E2EGate, present: Callable[[VirtualPurse], VpcdCard]) -> None:
    purse = card(gate, 1, FARE - 1)
    result = gate.tap(present(purse))
    assert gate.commands == [INS_SELECT, INS_INITIALIZE]  # the card answered 9401
    assert_refused(gate, purse, result, "insufficient balance", FARE - 1)


def test_blocked_card(gate: E2EGate, present: Callable[[VirtualPurse], VpcdCard]) -> None:
    purse = card(gate, 1, 5000, status=0x01)
    result = gate.tap(present(purse))
    assert gate.commands == [INS_SELECT]
    assert_refused(gate, purse, result, "card blocked", 5000)


def test_expired_card(gate: E2EGate, present: Callable[[VirtualPurse], VpcdCard]) -> None:
    purse = card(gate, 1, 5000, expiry=gate.clock.today() - dt.timedelta(days=1))
    result = gate.tap(present(purse))
    assert gate.commands == [INS_SELECT]
    assert_refused(gate, purse, result, "card expired", 5000)


def test_anti_passback(gate: E2EGate, present: Callable[[VirtualPurse], VpcdCard]) -> None:
    purse = card(gate, 1, 5000)
    vpcd = present(purse)
    assert gate.tap(vpcd).outcome is Outcome.ACCEPTED

    gate.clock.advance(gate.config.anti_passback_s - 1)
    again = gate.tap(vpcd)
    assert (again.outcome, again.reason) == (Outcome.REFUSED, "already passed this gate")
    assert gate.commands == [INS_SELECT]
    assert purse.balance == 5000 - FARE and gate.gate.passages == 1

    gate.clock.advance(2)  # the window is over
    later = gate.tap(vpcd)
    assert (later.outcome, later.balance) == (Outcome.ACCEPTED, 5000 - 2 * FARE)
    assert gate.commands == SELECT_INIT_DEBIT
    assert purse.balance == 5000 - 2 * FARE and len(purse.history) == 2
    assert gate.gate.passages == 2
    assert states(gate.entries()) == ["debit/intent", "debit/completed", "refusal/refused",
                                      "debit/intent", "debit/completed"]
    assert_ledger([purse], gate.journal)
    assert journal_problems(gate.journal) == []


# --- tears -----------------------------------------------------------------------------
TEARS = [
    pytest.param(kind, ins, id=f"{kind.value}-{name}")
    for ins, name in ((INS_SELECT, "select"), (INS_INITIALIZE, "initialize"),
                      (INS_DEBIT, "debit"))
    for kind in (FaultKind.TEAR_BEFORE, FaultKind.TEAR_AFTER, FaultKind.GARBAGE_AFTER)
]


@pytest.mark.parametrize(("kind", "ins"), TEARS)
def test_tear_then_the_same_card_again(
        gate: E2EGate, present: Callable[[VirtualPurse], VpcdCard], kind: FaultKind,
        ins: int) -> None:
    purse = card(gate, 1, 5000)
    purse.inject(Fault(kind, ins))  # the default garbage is one byte: never empty on vpcd
    vpcd = present(purse)

    first = gate.tap(vpcd)
    assert first.outcome is Outcome.TAP_AGAIN, first
    assert gate.gate.passages == 0
    assert gate.signals() == [Signal.TAP_AGAIN]
    assert not purse.faults  # the fault fired
    debited = ins == INS_DEBIT and kind is not FaultKind.TEAR_BEFORE
    assert len(purse.history) == int(debited)
    if ins == INS_DEBIT:
        assert first.torn
        assert states(gate.entries()) == ["debit/intent", "debit/torn"]
    else:  # nothing can have happened on the card: nothing to journal
        assert not first.torn
        assert gate.entries() == []
    seen = gate.journal.tail_id

    second = gate.tap(vpcd)
    assert second.opened, second
    assert (second.serial, second.amount, second.balance) == (purse.serial, FARE, 5000 - FARE)
    after = gate.entries(seen)
    if debited:  # the card's log shows the torn debit: the proof is recovered, no new debit
        assert second.outcome is Outcome.RECOVERED
        assert gate.commands == [INS_SELECT, INS_READ_RECORD, INS_PROOF]
        [recovered] = after
        assert (recovered.kind, recovered.state) == ("recovery", "recovered")
        assert recovered.tac == purse.history[0].tac
        assert recovered.mac2 == purse.history[0].mac2
        assert recovered.balance_after == 5000 - FARE
    elif ins == INS_DEBIT:  # torn before the card acted: settled as not debited, then debited
        assert second.outcome is Outcome.ACCEPTED
        assert gate.commands == [INS_SELECT, INS_READ_RECORD, *SELECT_INIT_DEBIT[1:]]
        assert states(after) == ["recovery/not_debited", "debit/intent", "debit/completed"]
        assert after[2].tac == purse.history[0].tac
    else:
        assert second.outcome is Outcome.ACCEPTED
        assert gate.commands == SELECT_INIT_DEBIT
        assert states(after) == ["debit/intent", "debit/completed"]
        assert after[1].tac == purse.history[0].tac
    assert gate.journal.pending_recoveries(purse.serial) == []
    assert_debited_once(gate, purse, 5000)


def test_a_tear_waits_for_its_card_while_others_tap(
        gate: E2EGate, present: Callable[[VirtualPurse], VpcdCard]) -> None:
    torn = card(gate, 1, 5000)
    torn.inject(Fault(FaultKind.TEAR_AFTER, INS_DEBIT))
    others = [card(gate, n, 3000) for n in (2, 3)]
    torn_vpcd = present(torn)

    assert gate.tap(torn_vpcd).torn
    for other in others:
        assert gate.tap(present(other)).outcome is Outcome.ACCEPTED
    back = gate.tap(torn_vpcd)
    assert (back.outcome, back.balance) == (Outcome.RECOVERED, 5000 - FARE)
    assert len(torn.history) == 1 and torn.balance == 5000 - FARE
    assert [o.balance for o in others] == [3000 - FARE] * 2
    assert gate.gate.passages == 3
    recovered = gate.entries()[-1]
    assert (recovered.state, recovered.tac) == ("recovered", torn.history[0].tac)
    assert_ledger([torn, *others], gate.journal)
    assert journal_problems(gate.journal) == []
