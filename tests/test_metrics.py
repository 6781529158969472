"""The Prometheus exposition, read back by prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import Metrics, journal_gauges, serve_http, write_textfile
from hal.card.model import Fault, FaultKind
from tests.cards import INS_DEBIT
from tests.rig import Rig


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def exposition(rig: Rig, metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render(journal_gauges(rig.journal, rig.clock()), rig.journal.recovery_counts())
    return samples(text)


def test_taps_tears_recoveries_and_latency_are_counted(rig: Rig) -> None:
    metrics = Metrics()
    card, other = rig.card(1, 5000), rig.card(2, 100)
    card.inject(Fault(FaultKind.TEAR_AFTER, ins=INS_DEBIT))
    for c, seconds in ((card, 0.004), (other, 0.03), (card, 0.012)):
        metrics.observe_tap(rig.tap(c), seconds)
    rig.clock.advance(60)
    got = exposition(rig, metrics)
    taps = {dict(k[1])["outcome"]: v for k, v in got.items() if k[0] == "tapgate_taps_total"}
    assert taps == {"accepted": 0, "recovered": 1, "refused": 1, "tap_again": 1,
                    "out_of_service": 0}
    assert got[("tapgate_tears_total", ())] == 1
    assert got[("tapgate_recoveries_total", (("result", "recovered"),))] == 1
    assert got[("tapgate_tap_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert got[("tapgate_tap_latency_seconds_bucket", (("le", "0.02"),))] == 2
    assert got[("tapgate_tap_latency_seconds_bucket", (("le", "+Inf"),))] == 3
    assert got[("tapgate_tap_latency_seconds_count", ())] == 3
    assert got[("tapgate_tap_latency_seconds_sum", ())] == pytest.approx(0.046)
    assert got[("tapgate_journal_entries", ())] == rig.journal.count()
    assert got[("tapgate_journal_bytes", ())] > 0
    assert got[("tapgate_pending_recoveries", ())] == 0
    assert got[("tapgate_sync_lag_seconds", ())] == pytest.approx(60, abs=0.01)


def test_pending_recoveries_come_from_the_journal(rig: Rig) -> None:
    card = rig.card(1, 5000)
    card.inject(Fault(FaultKind.TEAR_BEFORE, ins=INS_DEBIT))
    rig.tap(card)
    assert exposition(rig, Metrics())[("tapgate_pending_recoveries", ())] == 1


def test_textfile_is_replaced_whole(tmp_path: Path) -> None:
    write_textfile(tmp_path, "a 1\n")
    write_textfile(tmp_path, "a 2\n")
    assert (tmp_path / "tapgate.prom").read_text() == "a 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["tapgate.prom"]


def test_http_endpoint_serves_metrics_and_404s_the_rest(rig: Rig) -> None:
    metrics = Metrics()
    metrics.observe_tap(rig.tap(rig.card(1, 5000)), 0.01)
    port = _free_port()

    async def scenario() -> tuple[bytes, bytes]:
        stop = asyncio.Event()
        server = asyncio.create_task(
            serve_http("127.0.0.1", port, lambda: metrics.render(None, {}), stop))
        ok = await _get(port, b"/metrics")
        missing = await _get(port, b"/nope")
        stop.set()
        await server
        return ok, missing

    ok, missing = asyncio.run(scenario())
    head, _, body = ok.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"version=0.0.4" in head
    assert samples(body.decode())[("tapgate_taps_total", (("outcome", "accepted"),))] == 1
    assert missing.startswith(b"HTTP/1.0 404")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _get(port: int, path: bytes) -> bytes:
    deadline = time.monotonic() + 10
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)
    writer.write(b"GET " + path + b" HTTP/1.0\r\n\r\n")
    data = await reader.read()
    writer.close()
    return data
