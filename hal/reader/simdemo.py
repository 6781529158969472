"""Passengers for the built-in simulator: what `make run` shows with no hardware.

Cards in circulation tap the simulated reader one after another; some leave the field
mid-debit and come back, as real passengers do, so the recovery path is seen too.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading

from daemon.config import Config
from hal.card.model import Fault, FaultKind, VirtualPurse
from hal.reader.sim import SimReader
from hal.sam.software import read_key_file
from protocol.tgp1.apdu import LOG_RECORDS

log = logging.getLogger("tapgate.sim")

TOP_UP_BELOW = 500
TOP_UP_TO = 5000


class DemoRider:
    def __init__(self, reader: SimReader, cards: list[VirtualPurse], *, interval_s: float,
                 tear_rate: float, seed: int | None = None) -> None:
        self._reader = reader
        self._cards = cards
        self._interval = interval_s
        self._tear_rate = tear_rate
        self._random = random.Random(seed)

    @classmethod
    def from_config(cls, reader: SimReader, config: Config) -> DemoRider:
        key = config.sam.purchase_key
        if key is None and config.sam.key_file is not None:
            key = read_key_file(config.sam.key_file)
        assert key is not None
        cards = []
        for n in range(config.reader.sim_cards):
            cards.append(VirtualPurse(
                serial=bytes.fromhex("88010000") + n.to_bytes(4, "big"),
                balance=2000 + 100 * n,
                master_key=key,
                master_tac_key=config.reader.sim_tac_key,
                card_type=0x02 if n % 5 == 4 else 0x01,
                status=0x01 if n == 3 else 0x00,  # one blocked card in circulation
                expiry=dt.date(2020, 1, 31) if n == 6 else dt.date(2031, 12, 31),
                history_limit=2 * LOG_RECORDS,  # a demo that runs for weeks stays small
            ))
        return cls(reader, cards, interval_s=config.reader.sim_interval_s,
                   tear_rate=config.reader.sim_tear_rate)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self._interval):
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
            if torn and not stop.wait(self._interval / 2):
                log.info("sim: card %s taps again", card.serial.hex().upper())
                self._tap(card)

    def _tap(self, card: VirtualPurse) -> None:
        self._reader.present(card)
        self._reader.wait_until_handled(10.0)
        self._reader.remove()
