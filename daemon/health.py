"""The gate's health, one snapshot at a time: what status.json, the MQTT status and the
Prometheus metrics say about the running gate, read from its parts in one place.

:class:`HealthProbe` reads each source once per snapshot (the journal, the tap counters,
the reader, the tap processor, the beacon, the broker link, the operators' commands);
:class:`Health` is what it read, frozen, and decides what follows from it, such as the
disk alarm. The status writer takes a snapshot without the journal's gauges (each is
a query on the journal, and the status file does without them); the status telemetry
and a scrape take them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from daemon import __version__
from daemon.metrics import JournalGauges, Metrics, journal_gauges

if TYPE_CHECKING:
    from daemon.journal import Journal
    from daemon.tap import TapProcessor
    from hal.reader.base import Reader, ReaderState


class BrokerState(Protocol):
    """How the uplink's connection is (daemon.sync.link.BrokerLink)."""

    @property
    def address(self) -> str: ...  # host:port

    @property
    def connected(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Health:
    uptime_s: float
    reader: ReaderState
    taps: Mapping[str, int]  # since start, by outcome
    tears: int
    out_of_service: str  # why no debit can start now, "" in service
    disk_used_pct: float  # the journal's filesystem
    disk_alarm_pct: float  # mqtt.disk_alarm_pct
    below_reserve: bool  # less free than journal.reserve_bytes: no debit can start
    beacon: Mapping[str, Any] | None = None  # BeaconController.state(); None: no beacon
    broker: str | None = None  # host:port; None: no uplink
    broker_connected: bool = False
    commands: Mapping[str, Any] | None = None  # the operators' commands' counts
    journal: JournalGauges | None = None  # None: not read
    recoveries: Mapping[str, int] = field(default_factory=dict)  # with the journal's gauges

    @property
    def disk_alarm(self) -> bool:
        return self.disk_used_pct >= self.disk_alarm_pct

    def telemetry(self) -> dict[str, Any]:
        """The retained MQTT status's telemetry (protocol.contract.Status), but for what
        the uplink and the operators' commands add of their own."""
        gauges = self.journal
        if gauges is None:
            raise ValueError("the status telemetry needs a snapshot with the journal's gauges")
        alarms: dict[str, str] = {}
        if self.disk_alarm:
            alarms["disk"] = (f"journal disk {self.disk_used_pct:.1f}% full "
                              f"(alarm at {self.disk_alarm_pct:g}%)")
        if self.out_of_service:
            alarms["out_of_service"] = self.out_of_service
        return {
            "version": __version__,
            "uptime_s": round(self.uptime_s, 1),
            "taps": dict(self.taps),
            "tears": self.tears,
            "recoveries": dict(self.recoveries),
            "pending_sync": gauges.pending_sync,
            "sync_lag_s": round(gauges.sync_lag_s, 3),
            "pending_recoveries": gauges.pending_recoveries,
            "reader": self.reader.value,
            "journal": {"entries": gauges.entries, "bytes": gauges.bytes,
                        "disk_used_pct": round(self.disk_used_pct, 1)},
            "alarms": alarms,
            **({"beacon": dict(self.beacon)} if self.beacon is not None else {}),
            **({"commands": dict(self.commands)} if self.commands is not None else {}),
        }


class HealthProbe:
    """Takes :class:`Health` snapshots of one gate, from any thread."""

    def __init__(self, *, journal: Journal, metrics: Metrics, processor: TapProcessor,
                 reader: Reader, disk_alarm_pct: float, reserve_bytes: int,
                 beacon: Callable[[], Mapping[str, Any]] | None = None,
                 broker: BrokerState | None = None,
                 commands: Callable[[], Mapping[str, Any]] | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._journal = journal
        self._metrics = metrics
        self._processor = processor
        self._reader = reader
        self._disk_alarm_pct = disk_alarm_pct
        self._reserve_bytes = reserve_bytes
        self._beacon = beacon
        self._broker = broker
        self._commands = commands
        self._clock = clock
        self._monotonic = monotonic
        self._started = monotonic()

    def snapshot(self, *, journal: bool = True) -> Health:
        """The gate's health now; without the journal's gauges (and recoveries) when
        ``journal`` is False."""
        broker = self._broker
        return Health(
            uptime_s=self._monotonic() - self._started,
            reader=self._reader.state,
            taps=self._metrics.taps(),
            tears=self._metrics.tears,
            out_of_service=self._processor.out_of_service,
            disk_used_pct=self._journal.disk_used_pct(),
            disk_alarm_pct=self._disk_alarm_pct,
            below_reserve=self._journal.free_bytes() < self._reserve_bytes,
            beacon=self._beacon() if self._beacon is not None else None,
            broker=broker.address if broker is not None else None,
            broker_connected=broker is not None and broker.connected,
            commands=self._commands() if self._commands is not None else None,
            journal=journal_gauges(self._journal, self._clock()) if journal else None,
            recoveries=self._journal.recovery_counts() if journal else {},
        )

    def telemetry(self) -> dict[str, Any]:
        """A snapshot's status telemetry (what the operators' report_status answers)."""
        return self.snapshot().telemetry()
