"""A journal on a small disk (a 2 MiB tmpfs): a WAL that grew while checkpoints could
not finish (a reader held it, the disk was full) gives its room back once they can, and
the gate comes back into service by itself once space is freed; the reserve of free disk
a debit needs covers the room the WAL may grow back into."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.journal.db import WAL_LIMIT
from daemon.outcome import Outcome
from daemon.tap import TapProcessor
from tests.disk import TinyDisk, tiny_disk
from tests.rig import Rig

RESERVE = 1 << 20  # journal.reserve_bytes' default


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[TinyDisk]:
    with tiny_disk(tmp_path / "disk", size_kib=2048) as mounted:
        if mounted is None:
            pytest.skip("mounting a tmpfs needs root")
        yield mounted


def wal_size(rig: Rig) -> int:
    return os.stat(f"{rig.journal_path}-wal").st_size


def test_a_grown_wal_gives_its_room_back_and_the_gate_returns_to_service(
        small_disk: TinyDisk) -> None:
    rig = Rig(small_disk.path)
    try:
        rig.processor = TapProcessor(gate_config=rig.config, journal=rig.journal, sam=rig.sam,
                                     gate=rig.gate, clock=rig.clock,
                                     monotonic=rig.clock.monotonic, reserve_bytes=RESERVE)
        card = rig.card(1, 1_000_000)
        # a reader holds a snapshot: no checkpoint between taps can finish, the WAL grows
        reader = sqlite3.connect(rig.journal_path)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM entry").fetchone()
        taps = 0
        while rig.tap(card).outcome is Outcome.ACCEPTED:
            rig.processor.checkpoint()  # as the card loop does between taps
            rig.clock.advance(3600)
            taps += 1
            assert taps < 500
        assert wal_size(rig) > WAL_LIMIT
        assert rig.processor.out_of_service == "journal disk full"
        reader.close()

        # the disk fills up entirely meanwhile, then the space is freed again
        small_disk.fill()
        rig.processor.checkpoint()
        assert rig.tap(card).outcome is Outcome.OUT_OF_SERVICE
        small_disk.free()
        rig.processor.checkpoint()  # between taps, nothing else done by anyone
        result = rig.tap(card)
        assert result.outcome is Outcome.ACCEPTED, result
        assert wal_size(rig) <= WAL_LIMIT
        assert rig.journal.free_bytes() >= RESERVE
        assert rig.processor.out_of_service == ""
        assert rig.journal.verify().ok
    finally:
        rig.close()


def test_the_reserve_counts_the_room_the_wal_may_grow_back_into(small_disk: TinyDisk
                                                                ) -> None:
    rig = Rig(small_disk.path)
    try:
        rig.tap(rig.card(1, 5000))
        rig.processor.checkpoint()
        st = os.statvfs(small_disk.path)
        disk_free = st.f_bavail * st.f_frsize
        growth = max(0, WAL_LIMIT - wal_size(rig))
        assert growth > 0
        assert rig.journal.free_bytes() == disk_free - growth
    finally:
        rig.close()
