"""The checks that follow the ack: each stored entry's hash, signature and TAC.

The consumer stores a batch with these verdicts ``pending``, commits, acknowledges, and
moves on; verifying processes (processes, not threads: an Ed25519 check holds the GIL,
and a thread would hold up the consumer) read the pending entries back from the
database, check them with the head-end's keys (:class:`headend.verify.Verifier`) and
write the verdicts and the flag (:meth:`headend.store.Store.record_verdicts`). They run
at a lower CPU priority: what a gate waits for, storing and acknowledging, goes first,
and the checks take what is left. Each looks for pending entries again as soon as it
has written a chunk, and every IDLE_S when there were none.

The database is the only queue: an entry is pending until its verdicts are committed,
so a verifying process, or the whole head-end, that stops or dies leaves nothing
unchecked: whichever head-end runs next on that database checks it. Several instances
sharing a database may check the same entry at once; the verdicts are the same and the
second write finds the entry no longer pending.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from headend.store import Store, StoreError
from headend.verify import Verdict, Verifier

log = logging.getLogger("tapgate.headend.verdicts")

CHUNK = 200  # entries checked, then written in one transaction
IDLE_S = 0.25  # nothing pending: look again after this
NICENESS = 10  # below the consumer's storing and acking
RESTART_S = 5.0  # a verifying process that died is started again after this
STOP_S = 5.0  # how long a stopping process may take to finish its chunk


@dataclass
class _Process:
    part: int
    proc: Any = None  # multiprocessing.Process
    # the head-end's end of a pipe the process only reads: closed (by stop(), or by the
    # kernel when the head-end dies), it tells the process to leave. Not an mp.Event:
    # setting one blocks for good once a process waiting on it was killed (a systemd
    # stop signals every process of the unit).
    stop: Any = None
    started: float = 0.0


class VerifyingProcesses:
    """``parts`` processes checking the pending entries of the database at ``url``, each
    the entries whose row id is its part modulo ``parts``."""

    def __init__(self, *, url: str, verifier: Verifier, parts: int = 1) -> None:
        self.url = url
        self.verifier = verifier
        self.parts = parts
        self._ctx = mp.get_context("spawn")  # not fork: paho's thread may be running
        self._procs = [_Process(part) for part in range(parts)]
        self._stopping = False

    def start(self) -> None:
        for p in self._procs:
            self._spawn(p)
        log.info("%d verifying process(es) check what is stored, after the ack",
                 self.parts)

    def _spawn(self, p: _Process) -> None:
        root = logging.getLogger()
        fmt = getattr(root.handlers[0].formatter, "_fmt", None) if root.handlers else None
        told, p.stop = self._ctx.Pipe(duplex=False)
        p.proc = self._ctx.Process(
            target=_work, name=f"tapgate-verify-{p.part}", daemon=True,
            args=(self.url, self.verifier, p.part, self.parts, told, root.level, fmt))
        p.proc.start()
        told.close()  # the process has its own copy
        p.started = time.monotonic()
        try:  # from here, not from the process: its imports are work too
            os.setpriority(os.PRIO_PROCESS, p.proc.pid,
                           min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICENESS))
        except OSError as err:  # gone already: check() sees to it
            log.warning("verifying process %d: cannot lower its priority: %s", p.part, err)

    def check(self) -> None:
        """Start again a process that died (logged), not more often than RESTART_S."""
        for p in self._procs:
            if p.proc is None or p.proc.is_alive() or self._stopping:
                continue
            if time.monotonic() - p.started < RESTART_S:
                continue
            log.error("verifying process %d exited (%s); starting it again", p.part,
                      p.proc.exitcode)
            p.stop.close()
            self._spawn(p)

    def stop(self) -> None:
        """Stop them after their current chunk; what is still pending stays so, for the
        next run."""
        self._stopping = True
        for p in self._procs:
            if p.stop is not None:
                p.stop.close()
        for p in self._procs:
            if p.proc is None:
                continue
            p.proc.join(STOP_S)
            if p.proc.is_alive():
                log.warning("verifying process %d did not stop in %.0f s: terminated",
                            p.part, STOP_S)
                p.proc.terminate()
                p.proc.join(STOP_S)


def verify_pending(store: Store, verifier: Verifier, *, part: int = 0, parts: int = 1,
                   limit: int = CHUNK) -> int:
    """Check up to ``limit`` pending entries and record their verdicts; how many."""
    pending = store.unverified(limit, part=part, parts=parts)
    verdicts: dict[int, tuple[str, Verdict]] = {}
    for row_id, gate, text in pending:
        fields = json.loads(text)
        verdicts[row_id] = (gate, verifier.verify_fields(gate, fields))
    if verdicts:
        store.record_verdicts(verdicts)
    return len(pending)


def _work(url: str, verifier: Verifier, part: int, parts: int, told: Any, level: int,
          fmt: str | None) -> None:
    """One verifying process: until its pipe from the head-end says so (closed)."""
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=fmt or "%(levelname)s:%(name)s:%(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: the head-end stops us
    checked = 0
    try:
        with Store(url) as store:
            while True:
                try:
                    done = verify_pending(store, verifier, part=part, parts=parts)
                except StoreError as err:
                    log.error("%s", err)
                    done = 0
                checked += done
                if told.poll(0 if done else IDLE_S):  # EOF: stopped, or the head-end died
                    break
    except StoreError as err:
        log.error("verifying process %d: %s", part, err)
        sys.exit(1)
    log.info("verifying process %d: %d entries checked", part, checked)
