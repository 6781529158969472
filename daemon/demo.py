"""Passengers for the built-in simulator: what `make run` shows with no hardware.

Cards in circulation tap the simulated reader one after another; some leave the field
mid-debit and come back, as real passengers do, so the recovery path is seen too.

The daemon starts them (:func:`start`) when the sim reader is configured with demo taps
(``reader.sim_interval_s`` > 0). They ride while the card loop has the reader open: they
begin when it opens the reader and stop when it closes it.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading

from daemon.config import Config
from hal.card.model import Fault, FaultKind, VirtualPurse
from hal.reader.base import Reader
from hal.reader.sim import SimReader
from hal.sam.software import read_key_file
from protocol.tgp1.apdu import LOG_RECORDS

log = logging.getLogger("tapgate.sim")

TOP_UP_BELOW = 500
TOP_UP_TO = 5000


def demo_cards(count: int, *, purchase_key: bytes, tac_key: bytes) -> list[VirtualPurse]:
    """The cards in circulation: a few of each type, one blocked and one expired."""
    return [VirtualPurse(
        serial=bytes.fromhex("88010000") + n.to_bytes(4, "big"),
        balance=2000 + 100 * n,
        master_key=purchase_key,
        master_tac_key=tac_key,
        card_type=0x02 if n % 5 == 4 else 0x01,
        status=0x01 if n == 3 else 0x00,  # one blocked card in circulation
        expiry=dt.date(2020, 1, 31) if n == 6 else dt.date(2031, 12, 31),
        history_limit=2 * LOG_RECORDS,  # a demo that runs for weeks stays small
    ) for n in range(count)]


class DemoRider:
    def __init__(self, reader: SimReader, cards: list[VirtualPurse], *, interval_s: float,
                 tear_rate: float, seed: int | None = None) -> None:
        self._reader = reader
        self._cards = cards
        self._interval = interval_s
        self._tear_rate = tear_rate
        self._random = random.Random(seed)

    def run(self) -> None:
        """Tap until the reader closes, from the moment it opens."""
        while not self._reader.wait_until_open(1.0):
            pass
        while not self._reader.wait_until_closed(self._interval):
            card = self._random.choice(self._cards)
            if card.balance < TOP_UP_BELOW:
                card.balance = TOP_UP_TO
            torn = self._random.random() < self._tear_rate
            if torn:
                kind = self._random.choice([FaultKind.TEAR_BEFORE, FaultKind.TEAR_AFTER])
                card.inject(Fault(kind, ins=0x54))
                log.info("sim: card %s will leave the field mid-debit (%s)",
                         card.serial.hex().upper(), kind.value)
            self._tap(card)
            if torn and not self._reader.wait_until_closed(self._interval / 2):
                log.info("sim: card %s taps again", card.serial.hex().upper())
                self._tap(card)

    def _tap(self, card: VirtualPurse) -> None:
        self._reader.present(card)
        self._reader.wait_until_handled(10.0)
        self._reader.remove()


def start(reader: Reader, config: Config) -> DemoRider | None:
    """Demo passengers on ``reader`` if it is the simulator and [reader] asks for demo
    taps; None otherwise. They ride on a daemon thread of their own."""
    if not isinstance(reader, SimReader) or config.reader.sim_interval_s <= 0:
        return None
    key = config.sam.purchase_key
    if key is None and config.sam.key_file is not None:
        key = read_key_file(config.sam.key_file)
    assert key is not None  # validate() ensures one of them
    cards = demo_cards(config.reader.sim_cards, purchase_key=key,
                       tac_key=config.reader.sim_tac_key)
    rider = DemoRider(reader, cards, interval_s=config.reader.sim_interval_s,
                      tear_rate=config.reader.sim_tear_rate)
    threading.Thread(target=rider.run, name="sim-demo", daemon=True).start()
    return rider
