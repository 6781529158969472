"""One gate on the simulator, built from the real components: the sim reader with virtual
TGP1 cards, the software SAM with PURSE.md's test keys, the sim gate and a real SQLite
journal. The only things faked are time (a :class:`~tests.cards.Clock` the test moves
by hand) and, where a test asks for it, the death of the process (:class:`ProcessDied`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from daemon.config import GateConfig
from daemon.journal import Journal
from daemon.outcome import TapResult
from daemon.tap import TapProcessor
from hal.card.model import VirtualPurse
from hal.gate.sim import SimGateIO
from hal.reader.base import CardLink
from hal.reader.sim import SimReader
from hal.sam.software import SoftwareSam
from protocol.entry import INTENT, KIND_DEBIT, Draft, Entry
from protocol.tgp1 import apdu
from protocol.tgp1.crypto import Purchase
from tests.cards import MASTER_KEY, Clock, make_card
from tests.configs import gate_config


class ProcessDied(BaseException):
    """The gate's process stopped dead here: a BaseException, so that no except clause
    of the gate catches it and nothing after it runs."""


Hook = Callable[[], None]


def die() -> None:
    raise ProcessDied("the gate's process died here")


class TracingLink:
    """The sim reader's link, recording every command sent and running the test's hooks
    around the commands it names by INS (an after-hook runs even if the card tore)."""

    def __init__(self, link: CardLink, sent: list[bytes], before: Mapping[int, Hook],
                 after: Mapping[int, Hook]) -> None:
        self._link = link
        self._sent = sent
        self._before = before
        self._after = after

    @property
    def atr(self) -> bytes:
        return self._link.atr

    def transmit(self, command: bytes) -> bytes:
        self._sent.append(command)
        ins = command[1] if len(command) > 1 else -1
        if ins in self._before:
            self._before[ins]()
        try:
            return self._link.transmit(command)
        finally:
            if ins in self._after:
                self._after[ins]()

    def release(self) -> None:
        self._link.release()


class Rig:
    """One gate on the simulator: sim reader, journal in ``directory``, software SAM,
    sim gate I/O and the tap processor, all sharing one hand-moved clock."""

    def __init__(self, directory: Path, *, config: GateConfig | None = None,
                 clock: Clock | None = None) -> None:
        self.directory = Path(directory)
        self.clock = clock or Clock()
        self.config = config or gate_config()
        self.reader = SimReader()
        self.reader.open()
        self.sam = SoftwareSam(purchase_key=MASTER_KEY)
        self.gate = SimGateIO()
        self.journal_path = self.directory / "journal.db"
        self.journal = Journal(self.journal_path, clock=self.clock).open()
        self.processor = self._new_processor()
        self.sent: list[bytes] = []  # the commands of the latest tap

    def _new_processor(self) -> TapProcessor:
        return TapProcessor(gate_config=self.config, journal=self.journal, sam=self.sam,
                            gate=self.gate, clock=self.clock, monotonic=self.clock.monotonic)

    def card(self, serial: int | bytes, balance: int = 5000, **kw: Any) -> VirtualPurse:
        return make_card(serial, balance, clock=self.clock, **kw)

    def tap(self, card: VirtualPurse, *, before: Mapping[int, Hook] | None = None,
            after: Mapping[int, Hook] | None = None) -> TapResult:
        """Present ``card``, let the processor handle it, take the card away.

        ``before``/``after``: INS -> a function run just before that command goes to the
        card, or just after its exchange (e.g. :func:`die`, or filling the disk).
        """
        self.reader.present(card)
        link = self.reader.wait_for_card(0)
        assert link is not None, "the sim reader did not hand out the presented card"
        self.sent = []
        try:
            return self.processor.handle(
                TracingLink(link, self.sent, before or {}, after or {}))
        finally:
            link.release()
            self.reader.remove()

    @property
    def commands(self) -> list[int]:
        """The INS bytes of the latest tap's commands, in order."""
        return [c[1] for c in self.sent]

    def restart(self) -> list[Entry]:
        """What a restart does: the journal file closed and opened anew, a new processor,
        interrupted debits settled."""
        self.journal.close()
        self.journal = Journal(self.journal_path, clock=self.clock).open()
        self.processor = self._new_processor()
        return self.processor.settle_interrupted()

    def set_config(self, config: GateConfig) -> None:
        self.config = config
        self.processor.set_config(config)

    def entries(self) -> list[Entry]:
        return list(self.journal.entries())

    def new_entries(self, after: int) -> list[Entry]:
        return list(self.journal.entries(after_id=after))

    def close(self) -> None:
        self.journal.close()
        self.reader.close()


def begin_debit(rig: Rig, card: VirtualPurse, *, send_debit: bool) -> Entry:
    """Run a debit by hand up to the journalled intent, as the tap processor does, then stop
    as a process would that dies there; ``send_debit`` decides whether the card got DEBIT
    FOR PURCHASE first. Returns the dangling intent."""
    fare = rig.config.fare_for(card.card_type)
    assert fare
    rig.reader.present(card)
    link = rig.reader.wait_for_card(0)
    assert link is not None
    try:
        info = apdu.parse_select(link.transmit(apdu.select()))
        init = apdu.parse_initialize(
            link.transmit(apdu.initialize_for_purchase(fare, rig.config.terminal_id)))
        stamp = time.localtime(rig.clock())
        purchase = Purchase(
            card_random=init.card_random, counter=init.counter,
            terminal_seq=rig.journal.next_terminal_seq(), amount=fare,
            terminal_id=rig.config.terminal_id,
            date=bytes.fromhex(time.strftime("%Y%m%d", stamp)),
            time=bytes.fromhex(time.strftime("%H%M%S", stamp)))
        mac1 = rig.sam.mac1(info.serial, purchase)
        intent = rig.journal.append(Draft(
            kind=KIND_DEBIT, state=INTENT, terminal_id=rig.config.terminal_id, amount=fare,
            card_serial=info.serial, card_type=info.card_type, balance_before=init.balance,
            card_counter=init.counter, card_random=init.card_random,
            terminal_seq=purchase.terminal_seq, tx_date=purchase.date.hex(),
            tx_time=purchase.time.hex()))
        if send_debit:
            proof = apdu.parse_debit(link.transmit(apdu.debit_for_purchase(
                purchase.terminal_seq, purchase.date, purchase.time, mac1)))
            assert rig.sam.check_mac2(info.serial, purchase, proof.mac2)
    finally:
        link.release()
        rig.reader.remove()
    return intent
