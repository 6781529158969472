"""One tap, from SELECT to the gate opening.

SELECT → pending tears of this card settled → checks (status, expiry, anti-passback)
→ fare → INITIALIZE FOR PURCHASE → SAM MAC1 → intent journalled and fsynced → DEBIT FOR
PURCHASE → SAM checks MAC2 → gate opens → completion journalled with the TAC.

The intent is the one fsync the passenger waits for: after it, whatever happens to the
DEBIT exchange, the journal holds what is needed to find out later whether the card
paid. Before it, a failure changes nothing on the card and the tap is simply refused.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable

from daemon.config import GateConfig
from daemon.journal import Journal
from daemon.outcome import Outcome, TapResult
from daemon.recovery import Recoverer
from daemon.runclock import RunClock
from hal.gate.base import GateIO, Signal
from hal.reader.base import CardLink
from hal.sam.base import Sam
from protocol.entry import (
    COMPLETED,
    INTENT,
    KIND_DEBIT,
    KIND_PASS,
    KIND_REFUSAL,
    REFUSED,
    TORN,
    Draft,
    Entry,
)
from protocol.errors import CardFault, CardGone, CardStatus, JournalError, JournalFull
from protocol.tgp1 import apdu
from protocol.tgp1.apdu import CardInfo
from protocol.tgp1.crypto import Purchase

log = logging.getLogger("tapgate.tap")

# This run's passages are remembered (card -> monotonic time) at least this long, and as
# long as the anti-passback window: a card is asked about on every tap.
PASSAGES_KEPT_S = 3600.0


def bcd(*numbers: int) -> bytes:
    """Two decimal digits a byte, one byte a number (0..99): the card's date and time
    (YYYYMMDD, hhmmss), as bytes.fromhex(time.strftime(...)) has them, for less."""
    return bytes((n // 10) << 4 | n % 10 for n in numbers)


class DenyList:
    """The cards refused here whatever they hold, as the journal has them (versioned).

    The card loop only tests membership of an immutable set; an operator's delta swaps
    in a new set, under the lock, after the journal committed it."""

    def __init__(self, version: int = 0, serials: Iterable[bytes] = ()) -> None:
        self._lock = threading.Lock()
        self.version = version
        self._serials: frozenset[bytes] = frozenset(serials)

    def __contains__(self, serial: object) -> bool:
        return serial in self._serials

    def __len__(self) -> int:
        return len(self._serials)

    @property
    def serials(self) -> frozenset[bytes]:
        return self._serials

    def replace(self, version: int, serials: Iterable[bytes]) -> None:
        with self._lock:
            self._serials = frozenset(serials)
            self.version = version


class TapProcessor:
    def __init__(self, *, gate_config: GateConfig, journal: Journal, sam: Sam, gate: GateIO,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 reserve_bytes: int = 0) -> None:
        """``clock``: wall time, only for what is recorded (dates sent to cards, expiry);
        every window is measured on ``monotonic`` (:mod:`daemon.runclock`)."""
        self._cfg = gate_config
        self._reserve = reserve_bytes
        self.out_of_service = ""  # why no debit can start now ("" when in service)
        self._journal = journal
        self._sam = sam
        self._gate = gate
        self._clock = clock
        self._time = RunClock(first_id=journal.tail_id + 1, wall=clock, monotonic=monotonic)
        # card -> monotonic time of its latest passage in this run, oldest first: the
        # newest passage there is of each card in it, whatever the wall clock did since
        self._passed: dict[bytes, float] = {}
        self._recoverer = Recoverer(journal=journal, sam=sam)
        # Outcomes of journalled intents that the journal refused (disk full): written
        # before anything else, and no tap goes on until they are.
        self._owed: list[Draft] = []
        self.deny_list = DenyList(*journal.deny_list())

    @property
    def gate_config(self) -> GateConfig:
        """The fares and windows in force now."""
        return self._cfg

    def set_config(self, gate_config: GateConfig) -> None:
        """Take new fares and windows (a remote command, a reload) from the next tap on."""
        self._cfg = gate_config

    # -- between taps ------------------------------------------------------------------
    def settle_interrupted(self) -> list[Entry]:
        """Turn intents no outcome followed (the process died mid-debit) into tears."""
        self._write_owed()  # an outcome still in memory is no interrupted debit
        torn = []
        for intent in self._journal.dangling_intents():
            tear = self._tear(intent, "interrupted: no outcome recorded")
            torn.append(self._journal.append(tear))
            log.warning("intent %d of %s had no outcome: now a torn debit awaiting the card",
                        intent.id, (intent.card_serial or b"").hex().upper())
        return torn

    def checkpoint(self) -> None:
        """Between taps: fold the journal's WAL back (never inside a tap's commit)."""
        self._journal.checkpoint()

    def expire_recoveries(self) -> list[Entry]:
        return self._recoverer.expire(self._cfg.recovery_window_s, self._time)

    # -- the tap -----------------------------------------------------------------------
    def handle(self, link: CardLink) -> TapResult:
        """One tap. No garbage collection starts while it runs, in any thread: one is a
        millisecond or more on the passenger's time. Whatever collection came due runs
        at the first allocation after the tap, once the gate is open and the outcome
        journalled (a tap allocates little that lives on; nothing is lost by waiting)."""
        if not gc.isenabled():
            return self._handle(link)
        gc.disable()
        try:
            return self._handle(link)
        finally:
            gc.enable()

    def _handle(self, link: CardLink) -> TapResult:
        if self._reserve and self._journal.free_bytes() < self._reserve:
            # refuse before the card is touched: a debit must never start without room
            # for its intent, its outcome and any recovery
            self.out_of_service = "journal disk full"
            return self._signal(TapResult(Outcome.OUT_OF_SERVICE, self.out_of_service))
        try:
            info = apdu.parse_select(link.transmit(apdu.select()))
        except CardGone as err:
            return self._signal(TapResult(Outcome.TAP_AGAIN, f"card left: {err}"))
        except CardStatus:
            return self._journalled(None, lambda: self._refuse(None, "not a tapgate card"))
        except CardFault as err:
            log.warning("unreadable card: %s", err)
            return self._signal(TapResult(Outcome.TAP_AGAIN, "card not readable"))
        return self._journalled(info.serial, lambda: self._handle_card(link, info))

    def _journalled(self, serial: bytes | None, body: Callable[[], TapResult]) -> TapResult:
        """Run ``body`` once the journal has everything owed; if it cannot be written the
        gate is out of service."""
        try:
            self._write_owed()
            result = body()
        except JournalFull as err:
            log.error("journal full: %s", err)
            self.out_of_service = "journal full"
            return self._signal(TapResult(Outcome.OUT_OF_SERVICE, "journal full", serial))
        except JournalError as err:
            log.error("journal failed: %s", err)
            self.out_of_service = "journal error"
            return self._signal(TapResult(Outcome.OUT_OF_SERVICE, "journal error", serial))
        if self.out_of_service:
            log.warning("back in service: the journal takes writes again")
            self.out_of_service = ""
        return result

    def _write_owed(self) -> None:
        while self._owed:
            self._journal.append(self._owed[0])
            del self._owed[0]

    def _outcome(self, draft: Draft, *, durable: bool = True) -> Entry:
        """Journal what came of an intent; if the journal refuses it, keep it to write
        before anything else: a dangling intent is invisible to the card's next
        presentation, which would charge the card again."""
        try:
            return self._journal.append(draft, durable=durable)
        except JournalError:
            self._owed.append(draft)
            raise

    def _handle_card(self, link: CardLink, info: CardInfo) -> TapResult:
        serial = info.serial
        pending = self._journal.pending_recoveries(serial)
        if pending:
            try:
                resolution = self._recoverer.resolve(link, serial, pending)
            except CardGone as err:
                return self._signal(TapResult(Outcome.TAP_AGAIN, f"card left: {err}", serial))
            except CardFault as err:
                log.warning("recovery of %s interrupted: %s", serial.hex().upper(), err)
                return self._signal(TapResult(Outcome.TAP_AGAIN, "card not readable", serial))
            if resolution.paid is not None:
                # The card paid this trip before anything since (a block, the deny
                # list, expiry) could stop it: through, as it would have gone then.
                return self._accept(TapResult(Outcome.RECOVERED, "torn debit recovered", serial,
                                              resolution.amount, resolution.balance,
                                              resolution.paid.id))
            if resolution.uncertain and not resolution.not_debited:
                return self._refuse(info, "card fault: see staff")
        why = self._check(info)
        if why:
            return self._refuse(info, why)
        fare = self._cfg.fare_for(info.card_type)
        assert fare is not None  # _check refuses card types with no fare
        if fare == 0:
            entry = self._journal.append(Draft(
                kind=KIND_PASS, state=COMPLETED, terminal_id=self._cfg.terminal_id,
                card_serial=serial, card_type=info.card_type))
            return self._accept(TapResult(Outcome.ACCEPTED, "free pass", serial, 0, None, entry.id))
        return self._debit(link, info, fare)

    def _check(self, info: CardInfo) -> str:
        if info.blocked:
            return "card blocked"
        if info.serial in self.deny_list:
            return "card on deny list"
        now = self._clock()
        if info.expiry < dt.date.fromtimestamp(now):
            return "card expired"
        if self._cfg.fare_for(info.card_type) is None:
            return "card type not accepted here"
        if self._cfg.anti_passback_s > 0 and self._passed_within(info.serial,
                                                                 self._cfg.anti_passback_s):
            return "already passed this gate"
        return ""

    def _passed_within(self, serial: bytes, window_s: float) -> bool:
        passed = self._passed.get(serial)
        if passed is not None:
            return self._time.since(passed) < window_s
        # none in this run that memory keeps: the journal's, aged by the run clock (one
        # from before this run is at least as old as the run)
        window_ms = window_s * 1000
        # a passage a millisecond or more before the window (by the wall clock) is no
        # reason to refuse: no younger by the run clock either
        last = self._journal.last_passage(
            serial, after_ms=math.floor(self._clock() * 1000 - window_ms) - 1)
        return last is not None and self._time.age_s(*last) < window_s

    def _note_passage(self, serial: bytes) -> None:
        now = self._time.monotonic()
        self._passed.pop(serial, None)  # to the end: the newest
        self._passed[serial] = now
        kept = max(PASSAGES_KEPT_S, self._cfg.anti_passback_s)
        while True:  # the oldest first; the one just noted always stays
            old, at = next(iter(self._passed.items()))
            if now - at < kept:
                break
            del self._passed[old]

    def _debit(self, link: CardLink, info: CardInfo, fare: int) -> TapResult:
        serial = info.serial
        try:
            init = apdu.parse_initialize(
                link.transmit(apdu.initialize_for_purchase(fare, self._cfg.terminal_id)))
        except CardStatus as err:
            if err.sw == apdu.SW_INSUFFICIENT:
                return self._refuse(info, "insufficient balance")
            if err.sw == apdu.SW_BLOCKED_OR_EXPIRED:
                return self._refuse(info, "card blocked or expired")
            return self._refuse(info, f"card refused the purchase ({err.sw:04X})")
        except CardGone as err:
            return self._signal(TapResult(Outcome.TAP_AGAIN, f"card left: {err}", serial))
        except CardFault as err:
            log.warning("INITIALIZE FOR PURCHASE on %s: %s", serial.hex().upper(), err)
            return self._signal(TapResult(Outcome.TAP_AGAIN, "card not readable", serial))
        if init.balance < fare:  # a card that should have answered 9401
            return self._refuse(info, "insufficient balance", init.balance)

        stamp = time.localtime(self._clock())
        purchase = Purchase(
            card_random=init.card_random,
            counter=init.counter,
            terminal_seq=self._journal.next_terminal_seq(),
            amount=fare,
            terminal_id=self._cfg.terminal_id,
            date=bcd(stamp.tm_year // 100, stamp.tm_year % 100, stamp.tm_mon, stamp.tm_mday),
            time=bcd(stamp.tm_hour, stamp.tm_min, stamp.tm_sec),
        )
        mac1 = self._sam.mac1(serial, purchase)
        intent = self._journal.append(Draft(
            kind=KIND_DEBIT, state=INTENT, terminal_id=self._cfg.terminal_id, amount=fare,
            card_serial=serial, card_type=info.card_type, balance_before=init.balance,
            card_counter=init.counter, card_random=init.card_random,
            terminal_seq=purchase.terminal_seq, tx_date=purchase.date.hex(),
            tx_time=purchase.time.hex()))
        self._time.mark(intent.id)  # should it tear: its recovery window runs from now
        # From here on, any failure is a tear: the card may have debited.
        try:
            proof = apdu.parse_debit(link.transmit(apdu.debit_for_purchase(
                purchase.terminal_seq, purchase.date, purchase.time, mac1)))
        except CardStatus as err:
            return self._torn(intent, f"card refused the debit ({err.sw:04X})", deny=True)
        except CardGone:
            return self._torn(intent, "card left during the debit")
        except CardFault as err:
            return self._torn(intent, f"malformed debit answer: {err}")
        if not self._sam.check_mac2(serial, purchase, proof.mac2):
            return self._torn(intent, "MAC2 failed the SAM check")
        balance_after = init.balance - fare
        # The completion is written before the gate opens: a daemon killed between the
        # two must not leave an intent that the card's next presentation would take for
        # a tear, and open the gate again for free. Its fsync waits until the passenger
        # is through: until then it survives the process, not a power cut.
        completion = Draft(
            kind=KIND_DEBIT, state=COMPLETED, terminal_id=self._cfg.terminal_id, amount=fare,
            card_serial=serial, card_type=info.card_type, balance_before=init.balance,
            balance_after=balance_after, card_counter=init.counter, card_random=init.card_random,
            terminal_seq=purchase.terminal_seq, tx_date=intent.tx_date, tx_time=intent.tx_time,
            mac2=proof.mac2, tac=proof.tac, ref=intent.id)
        try:
            done = self._outcome(completion, durable=False)
        except JournalError:
            # the card paid: through anyway; the completion is owed, written first
            self._accept(TapResult(Outcome.ACCEPTED, "", serial, fare, balance_after,
                                   intent.id))
            raise
        self._time.forget(intent.id)  # completed: no window runs from it
        result = self._accept(
            TapResult(Outcome.ACCEPTED, "", serial, fare, balance_after, done.id))
        self._journal.sync()
        return result

    # -- outcomes ----------------------------------------------------------------------
    @staticmethod
    def _tear(intent: Entry, reason: str) -> Draft:
        return Draft(
            kind=KIND_DEBIT, state=TORN, terminal_id=intent.terminal_id, amount=intent.amount,
            reason=reason, card_serial=intent.card_serial, card_type=intent.card_type,
            balance_before=intent.balance_before, card_counter=intent.card_counter,
            card_random=intent.card_random, terminal_seq=intent.terminal_seq,
            tx_date=intent.tx_date, tx_time=intent.tx_time, ref=intent.id)

    def _torn(self, intent: Entry, reason: str, *, deny: bool = False) -> TapResult:
        entry = self._outcome(self._tear(intent, reason))
        log.warning("torn debit %d of %s: %s", entry.id,
                    (intent.card_serial or b"").hex().upper(), reason)
        outcome = Outcome.REFUSED if deny else Outcome.TAP_AGAIN
        return self._signal(TapResult(outcome, reason, intent.card_serial, intent.amount,
                                      None, entry.id, torn=True))

    def _refuse(self, info: CardInfo | None, reason: str, balance: int | None = None) -> TapResult:
        serial = info.serial if info else None
        result = TapResult(Outcome.REFUSED, reason, serial, 0, balance)
        self._signal(result)
        entry = self._journal.append(Draft(
            kind=KIND_REFUSAL, state=REFUSED, terminal_id=self._cfg.terminal_id, reason=reason,
            card_serial=serial, card_type=info.card_type if info else None,
            balance_before=balance))
        return TapResult(Outcome.REFUSED, reason, serial, 0, balance, entry.id)

    def _accept(self, result: TapResult) -> TapResult:
        if result.serial is not None:
            self._note_passage(result.serial)
        self._gate.open_for_passage()
        return self._signal(result)

    def _signal(self, result: TapResult) -> TapResult:
        signal = {
            Outcome.ACCEPTED: Signal.ACCEPT,
            Outcome.RECOVERED: Signal.ACCEPT,
            Outcome.REFUSED: Signal.DENY,
            Outcome.TAP_AGAIN: Signal.TAP_AGAIN,
            Outcome.OUT_OF_SERVICE: Signal.OUT_OF_SERVICE,
        }[result.outcome]
        text = result.reason or (
            f"balance {result.balance / 100:.2f}" if result.balance is not None else "")
        self._gate.show(signal, text)
        self._gate.beep(signal)
        return result
