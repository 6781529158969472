"""Recovery of torn debits (the method of US20150287024A1).

A torn debit is one whose DEBIT FOR PURCHASE exchange failed: the gate cannot know from
the failed exchange whether the card applied it. When the same card is presented again
the card's own log settles it:

* a log record with the torn session's counter, terminal id, terminal sequence and amount,
  whose balance-after is the balance-before less the amount, means the card debited: GET
  TRANSACTION PROOF gives back the MAC2 and TAC the tear lost, the SAM checks the MAC2,
  and the debit is recorded as recovered (no second debit);
* a log that never reached that counter, or used it for another transaction, means the
  card did not debit: the tear is closed as not_debited and a new debit may run, once.

A matching record whose proof the card no longer holds (a later debit elsewhere took its
place) still means the card debited: the tear is closed as unproven and the gate opens,
as for recovered; the back office settles it without a TAC. Anything else (the proof
fails its MAC2 check, the log no longer reaches back that far, a record that matches but
whose balances do not add up) is closed as uncertain, with everything the back office
needs to settle it by hand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from daemon.journal import Journal
from daemon.runclock import RunClock
from hal.reader.base import CardLink
from hal.sam.base import Sam
from protocol.entry import KIND_RECOVERY, NOT_DEBITED, RECOVERED, UNCERTAIN, UNPROVEN, Draft, Entry
from protocol.tgp1 import apdu
from protocol.tgp1.apdu import LogRecord
from protocol.tgp1.crypto import Purchase

log = logging.getLogger("tapgate.recovery")


@dataclass
class Resolution:
    not_debited: list[Entry] = field(default_factory=list)
    uncertain: list[Entry] = field(default_factory=list)
    paid: Entry | None = None  # the last closing entry that says the card paid this trip
    balance: int | None = None
    amount: int = 0

    @property
    def open_gate(self) -> bool:
        """The card paid for this passage already."""
        return self.paid is not None


def purchase_of(entry: Entry) -> Purchase:
    """The MAC inputs of the session an intent or tear recorded."""
    assert entry.card_random is not None and entry.card_counter is not None
    assert entry.terminal_seq is not None and entry.tx_date and entry.tx_time
    return Purchase(
        card_random=entry.card_random,
        counter=entry.card_counter,
        terminal_seq=entry.terminal_seq,
        amount=entry.amount,
        terminal_id=entry.terminal_id,
        date=bytes.fromhex(entry.tx_date),
        time=bytes.fromhex(entry.tx_time),
    )


def _closing(torn: Entry, state: str, reason: str, **extra: object) -> Draft:
    draft = Draft(
        kind=KIND_RECOVERY,
        state=state,
        terminal_id=torn.terminal_id,
        amount=torn.amount,
        reason=reason,
        card_serial=torn.card_serial,
        card_type=torn.card_type,
        balance_before=torn.balance_before,
        card_counter=torn.card_counter,
        card_random=torn.card_random,
        terminal_seq=torn.terminal_seq,
        tx_date=torn.tx_date,
        tx_time=torn.tx_time,
        ref=torn.id,
    )
    return replace(draft, **extra)  # type: ignore[arg-type]


class CardLog:
    """The card's transaction log, read record by record and only as far as needed."""

    def __init__(self, link: CardLink) -> None:
        self._link = link
        self._records: list[LogRecord] = []
        self._ended = False

    def record(self, number: int) -> LogRecord | None:
        while len(self._records) < number and not self._ended:
            answer = self._link.transmit(apdu.read_record(len(self._records) + 1))
            rec = apdu.parse_record(answer)
            if rec is None:
                self._ended = True
            else:
                self._records.append(rec)
        return self._records[number - 1] if number <= len(self._records) else None


def _matches(torn: Entry, rec: LogRecord) -> bool:
    return (
        rec.terminal_id == torn.terminal_id
        and rec.terminal_seq == torn.terminal_seq
        and rec.amount == torn.amount
        and rec.date.hex() == torn.tx_date
        and rec.time.hex() == torn.tx_time
    )


def _older(counter: int, than: int) -> bool:
    """Whether the card's u16 counter ``counter`` came before ``than``. The counter wraps
    (65535 + 1 = 0): compared on the circle, as serial numbers are (RFC 1982), so a card
    that wrapped since the tear is still read newer. The log holds far fewer records
    than half the circle."""
    return ((counter - than) & 0xFFFF) >= 0x8000


class Recoverer:
    def __init__(self, *, journal: Journal, sam: Sam) -> None:
        self._journal = journal
        self._sam = sam

    def resolve(self, link: CardLink, serial: bytes, pending: list[Entry]) -> Resolution:
        """Settle every pending tear of this card, oldest first.

        Card faults and a card leaving propagate (CardGone, CardFault): whatever was
        settled before is journalled, the rest stays pending for the next presentation.
        """
        result = Resolution()
        card_log = CardLog(link)
        for torn in pending:
            entry, paid = self._resolve_one(link, serial, torn, card_log)
            if paid:  # the card's log shows this gate's debit: never charge the trip again
                result.paid = entry
                result.amount += entry.amount
                result.balance = entry.balance_after
            log.info("torn debit %d of %s: %s (%s)", torn.id, serial.hex().upper(),
                     entry.state, entry.reason)
            if entry.state == NOT_DEBITED:
                result.not_debited.append(entry)
            elif entry.state == UNCERTAIN:
                result.uncertain.append(entry)
        return result

    def _resolve_one(
        self, link: CardLink, serial: bytes, torn: Entry, card_log: CardLog
    ) -> tuple[Entry, bool]:
        """The closing entry, and whether the card paid this gate for the torn trip."""
        assert torn.card_counter is not None and torn.balance_before is not None
        number = 1
        while True:
            rec = card_log.record(number)
            if rec is None or _older(rec.counter_before, torn.card_counter):
                # the card's counter never reached this session's: it did not debit
                why = "card log ends before the torn counter" if rec is None else (
                    f"card log record {number} is older than the torn counter")
                return self._close(torn, NOT_DEBITED, why), False
            if rec.counter_before == torn.card_counter:
                break
            number += 1
            if number > apdu.LOG_RECORDS:
                return self._close(torn, UNCERTAIN, "card log no longer reaches back"), False
        if not _matches(torn, rec):
            why = f"counter {torn.card_counter} was used by another transaction"
            return self._close(torn, NOT_DEBITED, why), False
        expected_after = torn.balance_before - torn.amount
        if rec.balance_after != expected_after:
            why = f"card log balance after {rec.balance_after} is not {expected_after}"
            return self._close(torn, UNCERTAIN, why, balance_after=rec.balance_after), False
        if number != 1:
            why = f"debited per card log record {number}; proof overwritten"
            return self._close(torn, UNPROVEN, why, balance_after=rec.balance_after), True
        proof = apdu.parse_proof(link.transmit(apdu.get_transaction_proof(torn.card_counter)))
        if proof is None:
            why = "card log shows the debit but the card has no proof for it"
            return self._close(torn, UNPROVEN, why, balance_after=rec.balance_after), True
        if not self._sam.check_mac2(serial, purchase_of(torn), proof.mac2):
            why = "recovered MAC2 fails the SAM check"
            return self._close(torn, UNCERTAIN, why, balance_after=rec.balance_after,
                               mac2=proof.mac2, tac=proof.tac), False
        why = "card debited before the tear; proof recovered"
        return self._close(torn, RECOVERED, why, balance_after=rec.balance_after,
                           mac2=proof.mac2, tac=proof.tac), True

    def _close(self, torn: Entry, state: str, reason: str, **extra: object) -> Entry:
        return self._journal.append(_closing(torn, state, reason, **extra))

    def expire(self, window_s: float, clock: RunClock) -> list[Entry]:
        """Close as uncertain every tear older than the recovery window, by ``clock``
        (a wall clock set forward or back neither expires a tear early nor keeps it)."""
        expired = []
        pending = self._journal.pending_recoveries()
        for torn in pending:
            # the window runs from the intent (written before its tear): a tear written
            # at a restart is no younger
            intent = self._journal.get(torn.ref) if torn.ref is not None else None
            start = intent if intent is not None else torn
            age = clock.age_s(start.id, start.created_ms)
            if age >= window_s:
                expired.append(
                    self._close(torn, UNCERTAIN, f"not recovered within {window_s:g} s"))
        # the intents of tears still open are all whose age is asked again
        clock.retain({torn.ref for torn in pending if torn.ref is not None})
        return expired
