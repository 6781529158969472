"""Prometheus metrics in the text exposition format (version 0.0.4).

Counters and the latency histogram are fed by the card loop; gauges that describe the
journal (pending recoveries, pending sync, sync lag, size) are read from the journal
itself when scraped, so they cannot drift from the source of truth. Served on a
localhost port, or written atomically to node-exporter's textfile directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.journal import Journal
from daemon.outcome import Outcome, TapResult
from hal.reader.base import ReaderState

log = logging.getLogger("tapgate.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


@dataclass(frozen=True, slots=True)
class JournalGauges:
    entries: int
    bytes: int
    pending_recoveries: int
    pending_sync: int
    sync_lag_s: float  # age of the oldest entry the head-end has not acknowledged


def beacon_lines(state: Mapping[str, Any]) -> list[str]:
    """The beacon task's state (BeaconController.state) as metrics."""
    return [
        "# HELP tapgate_beacon_on_air Advertisements on air now (one per frame).",
        "# TYPE tapgate_beacon_on_air gauge",
        f"tapgate_beacon_on_air {len(state['on_air'])}",
        "# HELP tapgate_beacon_triggers_total Beacon triggers taken, by source.",
        "# TYPE tapgate_beacon_triggers_total counter",
        *(f'tapgate_beacon_triggers_total{{source="{src}"}} {state["triggers"].get(src, 0)}'
          for src in ("tap", "command", "button")),
        "# HELP tapgate_beacon_rotations_total EID changes put on air.",
        "# TYPE tapgate_beacon_rotations_total counter",
        f"tapgate_beacon_rotations_total {state['rotations']}",
        "# HELP tapgate_beacon_radio_up Whether the beacon's radio (bluetoothd, the adapter) "
        "works.",
        "# TYPE tapgate_beacon_radio_up gauge",
        f"tapgate_beacon_radio_up {0 if state['last_error'] else 1}",
    ]


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taps = {outcome: 0 for outcome in Outcome}
        self._tears = 0
        self._buckets = [0] * len(LATENCY_BUCKETS)
        self._latency_sum = 0.0
        self._latency_count = 0
        self.reader_up = 0

    def observe_tap(self, result: TapResult, seconds: float) -> None:
        with self._lock:
            self._taps[result.outcome] += 1
            if result.torn:
                self._tears += 1
            self._latency_sum += seconds
            self._latency_count += 1
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self._buckets[i] += 1

    def taps(self) -> dict[str, int]:
        """Taps so far, by outcome."""
        with self._lock:
            return {o.value: n for o, n in self._taps.items()}

    @property
    def tears(self) -> int:
        with self._lock:
            return self._tears

    def observe_reader(self, name: str, state: ReaderState) -> None:
        """A ReaderListener (daemon.loop)."""
        self.reader_up = int(state is ReaderState.READY)

    def render(self, journal: JournalGauges | None, recoveries: Mapping[str, int], *,
               beacon: Mapping[str, Any] | None = None) -> str:
        """The exposition: the counters here, and the gauges of a health snapshot (the
        journal's, the beacon task's state) when given."""
        with self._lock:
            taps = dict(self._taps)
            tears, buckets = self._tears, list(self._buckets)
            total, count = self._latency_sum, self._latency_count
        out = [
            "# HELP tapgate_taps_total Taps handled, by outcome.",
            "# TYPE tapgate_taps_total counter",
            *(f'tapgate_taps_total{{outcome="{o.value}"}} {n}' for o, n in taps.items()),
            "# HELP tapgate_tears_total Debits torn (card left or answered wrongly mid-debit).",
            "# TYPE tapgate_tears_total counter",
            f"tapgate_tears_total {tears}",
            "# HELP tapgate_recoveries_total Torn debits settled, by result (from the journal).",
            "# TYPE tapgate_recoveries_total counter",
            *(f'tapgate_recoveries_total{{result="{r}"}} {n}' for r, n in recoveries.items()),
            "# HELP tapgate_tap_latency_seconds Card in the field to outcome shown.",
            "# TYPE tapgate_tap_latency_seconds histogram",
            *(f'tapgate_tap_latency_seconds_bucket{{le="{b:g}"}} {n}'
              for b, n in zip(LATENCY_BUCKETS, buckets, strict=True)),
            f'tapgate_tap_latency_seconds_bucket{{le="+Inf"}} {count}',
            f"tapgate_tap_latency_seconds_sum {total:.6f}",
            f"tapgate_tap_latency_seconds_count {count}",
            "# HELP tapgate_reader_up Whether the card reader is ready.",
            "# TYPE tapgate_reader_up gauge",
            f"tapgate_reader_up {self.reader_up}",
        ]
        if journal is not None:
            out += [
                "# HELP tapgate_journal_entries Entries in the journal.",
                "# TYPE tapgate_journal_entries gauge",
                f"tapgate_journal_entries {journal.entries}",
                "# HELP tapgate_journal_bytes Size of the journal files (database and WAL).",
                "# TYPE tapgate_journal_bytes gauge",
                f"tapgate_journal_bytes {journal.bytes}",
                "# HELP tapgate_pending_recoveries Torn debits awaiting their card.",
                "# TYPE tapgate_pending_recoveries gauge",
                f"tapgate_pending_recoveries {journal.pending_recoveries}",
                "# HELP tapgate_pending_sync Entries the head-end has not acknowledged.",
                "# TYPE tapgate_pending_sync gauge",
                f"tapgate_pending_sync {journal.pending_sync}",
                "# HELP tapgate_sync_lag_seconds Age of the oldest unacknowledged entry.",
                "# TYPE tapgate_sync_lag_seconds gauge",
                f"tapgate_sync_lag_seconds {journal.sync_lag_s:.3f}",
            ]
        if beacon is not None:
            out += beacon_lines(beacon)
        return "\n".join(out) + "\n"


def journal_gauges(journal: Journal, now: float) -> JournalGauges:
    """Read from the journal when scraped (any thread: the journal reads on its own
    connection per thread, and WAL lets it read beside the writer)."""
    oldest = journal.oldest_unacked_ms()
    return JournalGauges(
        entries=journal.count(),
        bytes=journal.size_bytes(),
        pending_recoveries=len(journal.pending_recoveries()),
        pending_sync=journal.pending_sync_count(),
        sync_lag_s=max(0.0, now - oldest / 1000) if oldest is not None else 0.0,
    )


def write_textfile(directory: Path, text: str) -> None:
    """node-exporter's textfile collector reads *.prom; write then rename, never half a file."""
    target = directory / "tapgate.prom"
    tmp = directory / f".tapgate.prom.{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)


async def serve_http(host: str, port: int, render: Callable[[], str],
                     stop: asyncio.Event) -> None:
    """A minimal HTTP/1.0 endpoint: GET /metrics answers the exposition, anything else 404."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if request.startswith(b"GET ") and path in (b"/metrics", b"/"):
                body = (await asyncio.to_thread(render)).encode()
                head = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
            else:
                body, head = b"not found\n", b"HTTP/1.0 404 Not Found\r\nContent-Length: 10\r\n\r\n"
            writer.write(head + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    log.info("metrics on http://%s:%d/metrics", host, port)
    async with server:
        await stop.wait()
