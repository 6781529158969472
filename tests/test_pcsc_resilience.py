"""The PC/SC reader keeps working through what a gate's pcscd and USB reader go through:
the service restarting, the reader unplugged and plugged back.

Recovery times are printed (``pytest -s``), never asserted: the machine is shared.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from hal.card.vpcd import VpcdCard
from hal.reader.base import CardLink, ReaderState
from protocol.tgp1 import apdu
from tests.fixtures.pcsc import Pcscd, make_purse
from tests.waiting import wait_until

pytest.importorskip("smartcard", reason="pyscard is not installed")
from hal.reader.pcsc import PcscReader
from protocol.errors import CardGone, HardwareUnavailable

pytestmark = pytest.mark.pcsc

DEADLINE_S = 30.0  # taps must come back within this; how fast is only reported
GLOB = "Virtual PCD * 00"  # the first vpcd reader, by pattern


@pytest.fixture
def reader() -> Iterator[PcscReader]:
    pcsc = PcscReader(name=GLOB, poll_s=0.1)
    pcsc.open()
    try:
        yield pcsc
    finally:
        pcsc.close()


@pytest.fixture
def card_loop() -> Iterator[ThreadPoolExecutor]:
    """A thread to block in the reader the way the daemon's card loop does."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="card-loop") as pool:
        yield pool


def check_tap(link: CardLink | None, vpcd: VpcdCard) -> None:
    assert link is not None, f"no tap within {DEADLINE_S:.0f} s"
    assert apdu.parse_select(link.transmit(apdu.select())).serial == vpcd.card.serial
    link.release()


def tap_once(reader: PcscReader, vpcd: VpcdCard) -> None:
    """Present, tap, take away: the reader works."""
    vpcd.insert(timeout=DEADLINE_S)
    check_tap(reader.wait_for_card(DEADLINE_S), vpcd)
    vpcd.remove()
    assert reader.wait_for_removal(DEADLINE_S)


def test_taps_resume_after_pcscd_restarts_under_a_waiting_reader(
        owned_pcscd: Pcscd, reader: PcscReader, card_loop: ThreadPoolExecutor,
        vpcd_card: Callable[..., VpcdCard]) -> None:
    vpcd = vpcd_card(make_purse())
    tap_once(reader, vpcd)
    assert reader.state is ReaderState.READY

    waiting: Future[CardLink | None] = card_loop.submit(reader.wait_for_card, 3 * DEADLINE_S)
    owned_pcscd.stop()
    lost_after = wait_until(lambda: reader.state is ReaderState.NO_SERVICE, "NO_SERVICE",
                            DEADLINE_S)
    assert not waiting.done()

    owned_pcscd.start()
    back = time.monotonic()
    vpcd.insert(timeout=DEADLINE_S)
    inserted = time.monotonic()
    link = waiting.result(timeout=DEADLINE_S)
    tapped = time.monotonic()
    check_tap(link, vpcd)
    assert reader.state is ReaderState.READY
    print(f"\npcscd restart: NO_SERVICE seen {lost_after * 1000:.0f} ms after stop; "
          f"tap {1000 * (tapped - back):.0f} ms after pcscd listed the reader again "
          f"({1000 * (tapped - inserted):.0f} ms after the card was inserted)")


def test_taps_resume_after_pcscd_restarts_between_taps(
        owned_pcscd: Pcscd, reader: PcscReader, vpcd_card: Callable[..., VpcdCard]) -> None:
    vpcd = vpcd_card(make_purse())
    tap_once(reader, vpcd)

    owned_pcscd.restart(down_s=0.5)  # the reader is not looking while this happens
    back = time.monotonic()
    vpcd.insert(timeout=DEADLINE_S)
    check_tap(reader.wait_for_card(DEADLINE_S), vpcd)
    tapped = time.monotonic()
    assert reader.state is ReaderState.READY
    print(f"\npcscd restart between taps: tap {1000 * (tapped - back):.0f} ms after pcscd "
          "listed the reader again")


def test_card_resting_on_the_reader_through_a_restart_comes_back(
        owned_pcscd: Pcscd, reader: PcscReader, vpcd_card: Callable[..., VpcdCard]) -> None:
    """vpcd drops the card with pcscd; the card reconnects by itself (it still lies on
    the reader) and the gate can talk to it again."""
    vpcd = vpcd_card(make_purse())
    vpcd.insert(timeout=DEADLINE_S)
    owned_pcscd.restart()
    back = time.monotonic()
    wait_until(lambda: vpcd.inserted and vpcd.connections >= 2, "the card back on vpcd",
               DEADLINE_S)
    check_tap(reader.wait_for_card(DEADLINE_S), vpcd)
    print(f"\ncard resting through a pcscd restart: tap {1000 * (time.monotonic() - back):.0f}"
          " ms after pcscd listed the reader again")


def test_taps_resume_after_the_reader_is_unplugged_and_plugged_back(
        owned_pcscd: Pcscd, reader: PcscReader, card_loop: ThreadPoolExecutor,
        vpcd_card: Callable[..., VpcdCard]) -> None:
    vpcd = vpcd_card(make_purse())
    tap_once(reader, vpcd)

    waiting: Future[CardLink | None] = card_loop.submit(reader.wait_for_card, 3 * DEADLINE_S)
    owned_pcscd.unplug()
    gone_after = wait_until(lambda: reader.state is ReaderState.NO_READER, "NO_READER",
                            DEADLINE_S)
    assert not waiting.done()

    owned_pcscd.plug()
    back = time.monotonic()
    vpcd.insert(timeout=DEADLINE_S)
    link = waiting.result(timeout=DEADLINE_S)
    tapped = time.monotonic()
    check_tap(link, vpcd)
    assert reader.state is ReaderState.READY
    assert reader.name == "Virtual PCD 00 00"
    print(f"\nreader unplugged: NO_READER seen {gone_after * 1000:.0f} ms after pcscd came "
          f"back without it; tap {1000 * (tapped - back):.0f} ms after it was plugged back")


def test_a_reader_absent_at_open_is_picked_up_later(
        owned_pcscd: Pcscd, card_loop: ThreadPoolExecutor,
        vpcd_card: Callable[..., VpcdCard]) -> None:
    owned_pcscd.unplug()
    pcsc = PcscReader(name=GLOB, poll_s=0.1)
    pcsc.open()
    try:
        wait_until(lambda: pcsc.state is ReaderState.NO_READER, "NO_READER", DEADLINE_S)
        assert pcsc.wait_for_card(0.3) is None
        assert pcsc.wait_for_removal(0.3) is True  # nothing can be in an absent field
        owned_pcscd.plug()
        vpcd = vpcd_card(make_purse())
        vpcd.insert(timeout=DEADLINE_S)
        check_tap(pcsc.wait_for_card(DEADLINE_S), vpcd)
        assert pcsc.state is ReaderState.READY
    finally:
        pcsc.close()


def test_close_wakes_a_waiting_card_loop(
        pcscd: Pcscd, reader: PcscReader, card_loop: ThreadPoolExecutor) -> None:
    waiting = card_loop.submit(reader.wait_for_card, 3 * DEADLINE_S)
    time.sleep(0.3)
    reader.close()
    with pytest.raises(HardwareUnavailable):
        waiting.result(timeout=DEADLINE_S)
    assert reader.state is ReaderState.CLOSED


def test_service_lost_mid_tap_is_card_gone_and_taps_resume(
        owned_pcscd: Pcscd, reader: PcscReader, vpcd_card: Callable[..., VpcdCard]) -> None:
    vpcd = vpcd_card(make_purse())
    vpcd.insert(timeout=DEADLINE_S)
    link = reader.wait_for_card(DEADLINE_S)
    assert link is not None
    owned_pcscd.stop()
    with pytest.raises(CardGone):
        link.transmit(apdu.select())
    link.release()
    owned_pcscd.start()
    back = time.monotonic()
    check_tap(reader.wait_for_card(DEADLINE_S), vpcd)  # the card lay on the reader throughout
    print(f"\npcscd lost mid-tap: next tap {1000 * (time.monotonic() - back):.0f} ms after "
          "pcscd listed the reader again")
