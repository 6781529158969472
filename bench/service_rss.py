"""The daemon's resident memory over many taps: is it steady?

Runs the real daemon process (`python -m daemon.cli run`, config/tapgate.toml: the sim
backends) with the demo rider tapping as fast as it can (reader.sim_interval_s=0.001,
anti-passback off so that taps debit, tears at the config's rate), and reads VmRSS from
/proc/PID/status at READY=1 and as the taps go by. The rider taps --cards distinct cards
(1000 by default, as a gate sees many): with the config's 8, each card piles up thousands
of journal entries and the per-card query for pending tears, which reads all of a card's
entries, comes to dominate the tap.

The demo's simulated cards (hal.card.model.VirtualPurse) keep every debit they ever made in
``history``, in the daemon's process, so that tests can check the journal against the
card's ground truth. That is the simulator's memory, not the gate's: a real card keeps a
10-record cyclic log. So the same run is repeated, in the same invocation, with the
simulated cards keeping only their recent debits (everything else the real daemon), and
the difference is what the simulator's history costs per debit, beside the size of one
record computed here.

    python -m bench.service_rss [--taps 100000] [--cards 1000] [--variant both|full|capped]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import TERMINAL, scratch_dir
from bench.startup import Notify

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "tapgate.toml"
CAPPED_FLAG = "--daemon-with-capped-card-history"
KEEP_RECORDS = 10  # what a real TGP1 card keeps (its cyclic log), and all the daemon reads
STEADY_KIB = 4096  # growth from the 20% mark to the end below this counts as steady
TIMEOUT_S = 60.0
TAP = " tapgate.tap: tap "


def _cpu_s(pid: int) -> float:
    """User + system CPU time of the process so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Run:
    name: str
    taps: int = 0
    debits: int = 0  # accepted or recovered: a record added to a card's history
    rss_ready: int = 0
    marks: list[tuple[int, int]] = field(default_factory=list)  # (taps, KiB) at each 10%
    cpu: list[float] = field(default_factory=list)  # the daemon's CPU seconds at each mark
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.taps / self.seconds if self.seconds else 0.0

    def mark(self, percent: int) -> tuple[int, int]:
        """(taps, KiB) at the ``percent``% mark (10, 20, ... 100)."""
        return self.marks[percent // 10 - 1]


def run_daemon(name: str, taps: int, cards: int, interval_s: float, capped: bool) -> Run:
    work = scratch_dir()
    notify = Notify()
    prefix = [sys.executable, "-m", "bench.service_rss", CAPPED_FLAG] if capped else \
        [sys.executable, "-m", "daemon.cli"]
    argv = [*prefix, "run", "--config", str(CONFIG),
            "--set", f'journal.path="{work / "journal.db"}"',
            "--set", f"reader.sim_interval_s={interval_s}",
            "--set", f"reader.sim_cards={cards}",
            "--set", "gate.anti_passback_s=0"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TAPGATE_") and k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(NOTIFY_SOCKET=notify.address, PYTHONUNBUFFERED="1")
    run = Run(name)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    counted = threading.Condition()
    tail: list[str] = []

    def count() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if TAP in line:
                with counted:
                    run.taps += 1
                    run.debits += "accepted," in line or "recovered," in line
                    counted.notify_all()
            else:
                tail.append(line)
                del tail[:-20]

    reader = threading.Thread(target=count, daemon=True)
    reader.start()
    try:
        if not notify.wait_ready(proc, time.monotonic() + TIMEOUT_S):
            sys.exit(f"{name}: no READY=1 (exit {proc.poll()}):\n{''.join(tail)}")
        run.rss_ready = _rss_kib(proc.pid)
        cpu_ready = _cpu_s(proc.pid)
        started = time.monotonic()
        step = max(1, taps // 10)
        for target in range(step, taps + 1, step):
            with counted:
                while run.taps < target:
                    if proc.poll() is not None:
                        sys.exit(f"{name}: the daemon died (exit {proc.returncode}) after "
                                 f"{run.taps} taps:\n{''.join(tail)}")
                    counted.wait(1.0)
                seen = run.taps
            run.marks.append((seen, _rss_kib(proc.pid)))
            run.cpu.append(_cpu_s(proc.pid))
            done_before, cpu_before = (run.marks[-2][0], run.cpu[-2]) if len(run.cpu) > 1 \
                else (0, cpu_ready)
            print(f"  {name}: {seen:>7} taps  RSS {run.marks[-1][1]:>7} KiB  "
                  f"({seen / (time.monotonic() - started):.0f} taps/s; the daemon's CPU "
                  f"{(run.cpu[-1] - cpu_before) * 1000 / (seen - done_before):.2f} ms/tap "
                  "over the last 10%)", flush=True)
        run.seconds = time.monotonic() - started
        proc.send_signal(signal.SIGTERM)
        if proc.wait(TIMEOUT_S) != 0:
            sys.exit(f"{name}: exit {proc.returncode} on SIGTERM:\n{''.join(tail)}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        notify.close()
        shutil.rmtree(work, ignore_errors=True)
    return run


def debit_record_bytes() -> int:
    """What one more record in a simulated card's history costs: the DebitRecord and the
    objects only it holds, made the way VirtualPurse._debit makes them (slices of the APDUs,
    fresh MACs, ints past the small-int cache), each rounded up to pymalloc's 16-byte
    size classes, and its pointer in the list."""
    from hal.card.model import DebitRecord

    initialize = bytes(10) + TERMINAL + b"\x0f"
    debit = bytes(9) + bytes.fromhex(dt.date.today().strftime("%Y%m%d")) + bytes.fromhex("081500")
    # counter_before: the demo's cards make a few hundred debits at most, so their counter
    # stays a shared small int; balance_after and terminal_seq are objects of their own
    record = DebitRecord(counter_before=87, balance_after=4321, amount=250,
                         terminal_id=initialize[10:16], terminal_seq=98765,
                         date=debit[9:13], time=debit[13:16], mac2=os.urandom(4),
                         tac=os.urandom(4))
    objects: list[Any] = [record]
    objects += [v for v in (getattr(record, n) for n in record.__slots__)
                if not (isinstance(v, int) and -5 <= v <= 256)]  # small ints are shared
    return sum(-(-sys.getsizeof(o) // 16) * 16 for o in objects) + 8


def report(runs: list[Run]) -> None:
    print()
    for run in runs:
        (taps20, kib20), (taps_end, kib_end) = run.mark(20), run.mark(100)
        growth = kib_end - kib20
        print(f"{run.name}: {run.taps} taps ({run.debits} debits) in {run.seconds:.0f} s, "
              f"{run.rate:.0f} taps/s")
        print(f"  RSS at READY {run.rss_ready} KiB; at "
              + ", ".join(f"{p}% {run.mark(p)[1]}" for p in range(10, 101, 10)) + " KiB")
        print(f"  growth from the 20% mark to the end: {growth} KiB, "
              f"{growth * 1024 / max(1, taps_end - taps20):.0f} B per tap: "
              f"{'steady' if growth < STEADY_KIB else 'GROWING'} "
              f"(steady: under {STEADY_KIB} KiB)")
    full = next((r for r in runs if r.name == "full"), None)
    capped = next((r for r in runs if r.name == "capped"), None)
    per_record = debit_record_bytes()
    print(f"\none DebitRecord in a simulated card's history costs about {per_record} B "
          f"(object, its own bytes and ints, list slot)")
    if full and capped:
        extra = (full.marks[-1][1] - full.rss_ready) - (capped.marks[-1][1] - capped.rss_ready)
        print(f"full minus capped history, READY -> end: {extra} KiB over {full.debits} debits "
              f"= {extra * 1024 / max(1, full.debits):.0f} B per debit")
        print(f"(the capped cards still hold up to {2 * KEEP_RECORDS} records each: its RSS "
              "levels off once every card has made that many debits)")


def _capped_daemon(argv: Sequence[str]) -> int:
    """The real daemon, but the sim's cards keep only their recent debits (as real cards do)."""
    from daemon.cli import main as tapgate
    from hal.card.model import VirtualPurse

    class RecentDebits(list):  # type: ignore[type-arg]
        def append(self, record: object) -> None:
            super().append(record)
            if len(self) > 2 * KEEP_RECORDS:
                del self[:-KEEP_RECORDS]

    made = VirtualPurse.__post_init__

    def post_init(card: VirtualPurse) -> None:
        made(card)
        card.history = RecentDebits(card.history)

    VirtualPurse.__post_init__ = post_init  # type: ignore[method-assign]
    return tapgate(argv)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CAPPED_FLAG:
        sys.exit(_capped_daemon(sys.argv[2:]))
    parser = argparse.ArgumentParser()
    parser.add_argument("--taps", type=int, default=100_000)
    parser.add_argument("--cards", type=int, default=1000, help="reader.sim_cards")
    parser.add_argument("--interval", type=float, default=0.001,
                        help="reader.sim_interval_s: the demo rider's pause between taps")
    parser.add_argument("--variant", choices=("both", "full", "capped"), default="both")
    args = parser.parse_args()

    runs = []
    for name in ("full", "capped"):
        if args.variant in ("both", name):
            print(f"{name}: the daemon, {args.cards} sim cards keeping "
                  f"{'every debit' if name == 'full' else f'their last {KEEP_RECORDS}+ debits'}")
            runs.append(run_daemon(name, args.taps, args.cards, args.interval,
                                   capped=name == "capped"))
    report(runs)


if __name__ == "__main__":
    main()
