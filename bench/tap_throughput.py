"""Sustained taps per second with distinct cards, and RSS over many taps.

Runs the real TapProcessor and journal (WAL, synchronous=FULL) on the in-process
simulated reader, so the figure is tapgate's own cost plus the disk. Beside it, in the
same run: the rate of bare durable SQLite commits (each tap makes two: the intent and
the completion), which bounds what any gate with this disk can do.

    python -m bench.tap_throughput [--taps 100000] [--cards 5000]
"""

from __future__ import annotations

import argparse
import time

from bench.common import MASTER, MASTER_TAC, TERMINAL, rss_kib, scratch_dir, sqlite_commit_times
from daemon.config import GateConfig
from daemon.journal import Journal
from daemon.outcome import Outcome
from daemon.tap import TapProcessor
from hal.card.model import VirtualPurse
from hal.gate.sim import SimGateIO
from hal.reader.sim import SimReader
from hal.sam.software import SoftwareSam


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--taps", type=int, default=100_000)
    parser.add_argument("--cards", type=int, default=5_000)
    args = parser.parse_args()

    work = scratch_dir()
    baseline = sqlite_commit_times(work, 2000)
    commit_rate = len(baseline) / sum(baseline)

    journal = Journal(work / "journal.db").open()
    gate = SimGateIO()
    processor = TapProcessor(
        gate_config=GateConfig(terminal_id=TERMINAL, fares={1: 1}, anti_passback_s=0),
        journal=journal, sam=SoftwareSam(purchase_key=MASTER), gate=gate)
    reader = SimReader()
    reader.open()
    cards = [VirtualPurse(serial=n.to_bytes(8, "big"), balance=10**9, master_key=MASTER,
                          master_tac_key=MASTER_TAC) for n in range(args.cards)]
    rss_start = rss_kib()
    rss_marks: list[tuple[int, int]] = []
    accepted = 0
    started = time.perf_counter()
    for i in range(args.taps):
        reader.present(cards[i % len(cards)])
        link = reader.wait_for_card(1.0)
        assert link is not None
        try:
            result = processor.handle(link)
        finally:
            link.release()
        reader.remove()
        accepted += result.outcome is Outcome.ACCEPTED
        if (i + 1) % (args.taps // 10 or 1) == 0:
            rss_marks.append((i + 1, rss_kib()))
    elapsed = time.perf_counter() - started
    journal.close()

    rate = args.taps / elapsed
    print(f"taps: {args.taps} over {args.cards} distinct cards, {accepted} accepted")
    print(f"tapgate sustained rate:          {rate:8.1f} taps/s  (target >= 100/s)")
    print(f"bare durable SQLite commits:     {commit_rate:8.1f} commits/s "
          f"(2 per tap -> ceiling {commit_rate / 2:.1f} taps/s)")
    print(f"tapgate / ceiling:               {rate / (commit_rate / 2):8.2f}")
    print(f"RSS at start {rss_start} KiB; " +
          ", ".join(f"after {n}: {kib} KiB" for n, kib in rss_marks))
    if len(rss_marks) >= 2:
        growth = rss_marks[-1][1] - rss_marks[0][1]
        print(f"RSS growth from the first mark to the last: {growth} KiB")


if __name__ == "__main__":
    main()
