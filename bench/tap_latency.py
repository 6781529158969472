"""Tap latency on the real PC/SC stack: what tapgate adds to the card's own exchange.

Through pcscd + vsmartcard's vpcd reader + the real PcscReader, with the project's virtual
TGP1 cards on vpcd, in one run and interleaved (a, b, a, b … with the order swapped every
other round, and SQLite commit blocks spread through the run):

  a) tapgate: wait_for_card returned (the connected card handed over) → the gate opens
     (SimGateIO.open_for_passage), with the real TapProcessor, SoftwareSam and a journal
     on disk (bench.common.scratch_dir(), not tmpfs), a distinct card every tap. As on a
     deployed gate (README: signed journal), every entry is signed with a device key
     (--unsigned: not), and the journal is checkpointed before each card comes, as the
     card loop does in its idle time between taps;
  b) bare: the same commands on the same path with no journal: SELECT, INITIALIZE FOR
     PURCHASE, SAM MAC1, DEBIT FOR PURCHASE, SAM MAC2 check;
  c) one SQLite WAL synchronous=FULL commit (bench.common.sqlite_commit_times), in
     blocks of back-to-back commits spread through the run;
  c') the same commit, one per round, right after the reader's wait for the card to
     leave: the idle, cache-cold state a tap's intent commit runs in (on this machine
     that costs 2-3x a back-to-back commit);
  d) detection: the card put on the reader → wait_for_card returned (pcscd's polling).

Target: overhead = a p99 - b p99 <= c p99 + 2 ms (tapgate's one fsync before the gate
opens, plus 2 ms of its own). Informational: PASS or MISS, the exit status is 0 either way;
the same check against c' is printed beside it.

pcscd is started (with the vpcd reader) if none runs, and then stopped; a pcscd that was
already running is used and left alone.

    python -m bench.tap_latency [--taps 300] [--profile 0] [--unsigned]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import fcntl
import gc
import io
import json
import os
import pstats
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import (
    MASTER,
    MASTER_TAC,
    TERMINAL,
    pct,
    scratch_dir,
    sqlite_commit_times,
    summary,
)
from daemon.config import GateConfig
from daemon.journal import Journal
from daemon.outcome import Outcome
from daemon.tap import TapProcessor
from hal.card.model import VirtualPurse
from hal.card.vpcd import VpcdCard
from hal.gate.sim import SimGateIO
from hal.reader.base import CardLink
from hal.sam.software import SoftwareSam
from protocol.tgp1 import apdu
from protocol.tgp1.crypto import Purchase

FARE = 250
DEADLINE_S = 60.0
COMMIT_BLOCKS = 10  # SQLite commit blocks spread through the run


class TimedGate(SimGateIO):
    """The sim gate, noting when it opened (time.perf_counter()); a profiler running on
    the tap is stopped there, so that it shows only what the passenger waits for."""

    def __init__(self) -> None:
        super().__init__()
        self.opened_at: float | None = None
        self.profiler: cProfile.Profile | None = None

    def open_for_passage(self) -> None:
        self.opened_at = time.perf_counter()
        if self.profiler is not None:
            self.profiler.disable()
        super().open_for_passage()


# -- pcscd --------------------------------------------------------------------------------
@contextlib.contextmanager
def running_pcscd(work: Path, slot: int) -> Iterator[tuple[str, int]]:
    """pcscd with the vpcd reader: the one that runs, or one started (and stopped) here.
    Yields the reader's name and its vpcd port. The tests' Pcscd class does the work
    (it reports failures the pytest way, turned into SystemExit here)."""
    import pytest

    from tests.fixtures.pcsc import (
        VPCD_PORT,
        VPCD_READER,
        Pcscd,
        _find_pcscd,
        _find_vpcd,
        service_readers,
    )

    name, port = VPCD_READER.removesuffix("00") + f"{slot:02d}", VPCD_PORT + slot
    binary, driver = _find_pcscd(), _find_vpcd()
    readers = service_readers()
    if readers is not None:
        if name not in readers:
            raise SystemExit(f"a pcscd runs without {name!r} (readers: {readers})")
        print(f"using the pcscd already running (readers: {readers})")
        yield name, port
        return
    if binary is None or driver is None:
        raise SystemExit("pcscd and vsmartcard-vpcd must be installed "
                         "(Debian: apt-get install pcscd vsmartcard-vpcd)")
    (work / "pcscd").mkdir()
    daemon = Pcscd(binary=binary, driver=driver, workdir=work / "pcscd")
    try:
        daemon.start()
    except pytest.fail.Exception as err:
        daemon.close()
        raise SystemExit(f"cannot start pcscd: {err}") from None
    print(f"started pcscd (log {daemon.log_path})")
    try:
        if name not in (service_readers() or []):
            raise SystemExit(f"pcscd started without {name!r}")
        yield name, port
    finally:
        daemon.close()


@contextlib.contextmanager
def reader_lock(port: int) -> Iterator[None]:
    """Serialise with other users of the same vpcd reader that take this lock (the e2e
    tests): two programs putting cards on one reader would tap each other's cards."""
    path = Path("/tmp") / f"tapgate-vpcd-{port}.lock"
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {path} (another run uses the vpcd reader)")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class IdleCommit:
    """bench.common's baseline commit (WAL, synchronous=FULL, a journal-sized row), one at
    a time on a file kept open, to be timed when the loop has just been idle."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
        self._body = os.urandom(300)
        self.times: list[float] = []

    def commit(self) -> None:
        t0 = time.perf_counter()
        self._db.execute("BEGIN")
        self._db.execute("INSERT INTO t (body) VALUES (?)", (self._body,))
        self._db.execute("COMMIT")
        self.times.append(time.perf_counter() - t0)

    def close(self) -> None:
        self._db.close()


# -- one presentation ---------------------------------------------------------------------
def bare_exchange(link: CardLink, sam: SoftwareSam, terminal_seq: int) -> bool:
    """The card's debit with nothing of tapgate around it: SELECT, INITIALIZE, MAC1,
    DEBIT, MAC2 check."""
    info = apdu.parse_select(link.transmit(apdu.select()))
    init = apdu.parse_initialize(link.transmit(apdu.initialize_for_purchase(FARE, TERMINAL)))
    stamp = time.localtime()
    purchase = Purchase(card_random=init.card_random, counter=init.counter,
                        terminal_seq=terminal_seq, amount=FARE, terminal_id=TERMINAL,
                        date=bytes.fromhex(time.strftime("%Y%m%d", stamp)),
                        time=bytes.fromhex(time.strftime("%H%M%S", stamp)))
    mac1 = sam.mac1(info.serial, purchase)
    proof = apdu.parse_debit(link.transmit(apdu.debit_for_purchase(
        terminal_seq, purchase.date, purchase.time, mac1)))
    return sam.check_mac2(info.serial, purchase, proof.mac2)


class GcWatch:
    """Counts the garbage collections that run inside a timed window."""

    def __init__(self) -> None:
        self.timing = False
        self.collections = 0
        self.taps_with_gc = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and self.timing:
            self.collections += 1


class Bench:
    def __init__(self, work: Path, reader_name: str, port: int, *, signed: bool = True) -> None:
        from hal.reader.pcsc import PcscReader

        self.work = work
        self.port = port
        self.reader = PcscReader(name=reader_name, poll_s=0.1)
        self.reader.open()
        self.journal = Journal(work / "journal.db",
                               signer=Ed25519PrivateKey.generate() if signed else None).open()
        self.gate = TimedGate()
        self.sam = SoftwareSam(purchase_key=MASTER)
        # the default anti-passback window: a distinct card every tap, so each is accepted
        # and the anti-passback lookup runs as on a real gate
        self.processor = TapProcessor(
            gate_config=GateConfig(terminal_id=TERMINAL, fares={1: FARE}, anti_passback_s=300),
            journal=self.journal, sam=self.sam, gate=self.gate)
        self.processor.settle_interrupted()
        self.next_serial = 0x8802000000000000
        self.bare_seq = 0
        self.tapgate: list[float] = []
        self.bare: list[float] = []
        self.detect: list[float] = []
        self.failures: list[str] = []
        self.gc_watch = GcWatch()
        gc.callbacks.append(self.gc_watch)

    def close(self) -> None:
        gc.callbacks.remove(self.gc_watch)
        self.reader.close()
        self.journal.close()

    def _card(self) -> VpcdCard:
        self.next_serial += 1
        purse = VirtualPurse(serial=self.next_serial.to_bytes(8, "big"), balance=10**6,
                             master_key=MASTER, master_tac_key=MASTER_TAC)
        return VpcdCard(card=purse, port=self.port)

    @contextlib.contextmanager
    def _presented(self) -> Iterator[tuple[CardLink, float]]:
        """A new card in the field; yields the link and when wait_for_card returned. The
        card is taken away, and seen gone by pcscd, before the next presentation."""
        vpcd = self._card()
        try:
            put = time.perf_counter()
            vpcd.insert(timeout=DEADLINE_S)
            link = self.reader.wait_for_card(DEADLINE_S)
            handed = time.perf_counter()
            if link is None:
                raise RuntimeError(f"no card handed out within {DEADLINE_S:.0f} s")
            self.detect.append(handed - put)
            try:
                yield link, handed
            finally:
                link.release()
            vpcd.remove()
            if not self.reader.wait_for_removal(DEADLINE_S):
                raise RuntimeError("the card never left the field")
        finally:
            vpcd.close()

    def tap_tapgate(self, profiler: cProfile.Profile | None = None) -> None:
        # the card loop checkpoints in its idle time, while it waits for the next card
        self.processor.checkpoint()
        with self._presented() as (link, handed):
            self.gate.opened_at = None
            self.gate.profiler = profiler
            if profiler is not None:
                profiler.enable()
            collections = self.gc_watch.collections
            self.gc_watch.timing = True
            try:
                result = self.processor.handle(link)
            finally:
                self.gc_watch.timing = False
                if profiler is not None:
                    profiler.disable()
                self.gate.profiler = None
            if result.outcome is not Outcome.ACCEPTED or self.gate.opened_at is None:
                self.failures.append(f"tapgate tap: {result.describe()}")
                return
            if profiler is None:
                self.tapgate.append(self.gate.opened_at - handed)
                if self.gc_watch.collections != collections:
                    self.gc_watch.taps_with_gc += 1

    def tap_bare(self) -> None:
        with self._presented() as (link, handed):
            self.bare_seq += 1
            ok = bare_exchange(link, self.sam, self.bare_seq)
            done = time.perf_counter()
            if not ok:
                self.failures.append("bare exchange: MAC2 failed the check")
                return
            self.bare.append(done - handed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tap_latency")
    parser.add_argument("--taps", type=int, default=300,
                        help="taps of each kind (tapgate and bare), interleaved")
    parser.add_argument("--commits", type=int, default=0,
                        help="SQLite commits to time (default: as many as taps)")
    parser.add_argument("--slot", type=int, choices=(0, 1), default=0,
                        help="vpcd reader: 0 'Virtual PCD 00 00' (35963), 1 '... 00 01' (35964)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the measurement, N more tapgate taps under cProfile")
    parser.add_argument("--unsigned", action="store_true",
                        help="journal without a device key (entries not signed)")
    parser.add_argument("--samples", type=Path, metavar="FILE",
                        help="write every sample (seconds, in the order taken) as JSON")
    args = parser.parse_args(argv)
    taps = max(1, args.taps)
    commits = args.commits or taps
    per_block = max(1, -(-commits // COMMIT_BLOCKS))

    work = scratch_dir()
    print(f"tap latency through pcscd + vpcd; journal and SQLite baseline in {work}")
    with running_pcscd(work, args.slot) as (reader_name, port), reader_lock(port):
        bench = Bench(work, reader_name, port, signed=not args.unsigned)
        commit_times: list[float] = []
        idle = IdleCommit(work / "idle-commit.db")
        try:
            # one untimed round of each, to warm pcscd, the reader and the journal
            bench.tap_tapgate()
            bench.tap_bare()
            bench.tapgate.clear()
            bench.bare.clear()
            bench.detect.clear()
            bench.gc_watch.taps_with_gc = 0
            block_every = max(1, taps // COMMIT_BLOCKS)
            started = time.monotonic()
            for i in range(taps):
                first, second = ((bench.tap_tapgate, bench.tap_bare) if i % 2 == 0
                                 else (bench.tap_bare, bench.tap_tapgate))
                first()
                idle.commit()  # just after the wait for the card to leave, as a tap's
                second()
                if i % block_every == block_every - 1 or i == taps - 1:
                    want = min(per_block, commits - len(commit_times))
                    if want > 0:  # a fresh file each block; its first commit is warm-up
                        block = work / f"commits-{i}"
                        block.mkdir()
                        commit_times += sqlite_commit_times(block, want + 1)[1:]
                if (i + 1) % max(1, taps // 10) == 0:
                    print(f"  {i + 1}/{taps} rounds, {time.monotonic() - started:.0f} s",
                          flush=True)
            detect = list(bench.detect)
            profile_text = ""
            if args.profile > 0:
                profiler = cProfile.Profile()
                for _ in range(args.profile):
                    bench.tap_tapgate(profiler)
                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out)
                stats.sort_stats("cumulative").print_stats(30)
                stats.sort_stats("tottime").print_stats(20)
                profile_text = out.getvalue()
        finally:
            bench.close()
            idle.close()

    if bench.failures:
        print(f"{len(bench.failures)} taps did not go through: " + "; ".join(bench.failures[:5]))
    if not bench.tapgate or not bench.bare or not commit_times:
        print("not enough samples", file=sys.stderr)
        return 1
    if args.samples is not None:
        args.samples.write_text(json.dumps({
            "tapgate": bench.tapgate, "bare": bench.bare, "commit": commit_times,
            "idle_commit": idle.times, "detect": detect}))
    print()
    print(f"journal entries {'unsigned' if args.unsigned else 'signed (Ed25519)'}; "
          f"tapgate taps with a gc collection before the gate opened: "
          f"{bench.gc_watch.taps_with_gc}/{len(bench.tapgate)}")
    print(summary("a) tapgate: card handed → gate open", bench.tapgate))
    print(summary("b) bare APDU exchange (no journal)", bench.bare))
    print(summary("c) SQLite WAL FULL commit", commit_times))
    print(summary("c') the same, one after each idle", idle.times))
    print(summary("d) detection: insert → card handed", detect))
    ms = 1000.0
    a50, a99 = pct(bench.tapgate, 50) * ms, pct(bench.tapgate, 99) * ms
    b50, b99 = pct(bench.bare, 50) * ms, pct(bench.bare, 99) * ms
    c50, c99 = pct(commit_times, 50) * ms, pct(commit_times, 99) * ms
    overhead, budget = a99 - b99, c99 + 2.0
    print()
    print(f"overhead p50: a p50 - b p50 = {a50 - b50:.3f} ms (commit p50 {c50:.3f} ms)")
    a90, b90 = pct(bench.tapgate, 90) * ms, pct(bench.bare, 90) * ms
    print(f"overhead p90: a p90 - b p90 = {a90 - b90:.3f} ms (commit p90 "
          f"{pct(commit_times, 90) * ms:.3f} ms)")
    print(f"overhead p99: a p99 - b p99 = {a99:.3f} - {b99:.3f} = {overhead:.3f} ms")
    print(f"target: overhead <= commit p99 + 2 ms = {c99:.3f} + 2 = {budget:.3f} ms  "
          f"{'PASS' if overhead <= budget else 'MISS'}")
    i99 = pct(idle.times, 99) * ms
    print(f"  like for like (c'): overhead <= {i99:.3f} + 2 = {i99 + 2:.3f} ms  "
          f"{'PASS' if overhead <= i99 + 2 else 'MISS'}  (informational)")
    if profile_text:
        print(f"\ncProfile of {args.profile} tapgate taps, card handed → gate open:")
        print(profile_text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
