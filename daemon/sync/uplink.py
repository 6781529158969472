"""The uplink's drain: the journal is the outbox, the head-end's ack the only proof of sync.

Entries the head-end has not acknowledged are read from the journal in id order and
published in batches, QoS 1, on ``tapgate/v1/<gate>/tx`` with the ack topic as MQTT v5
Response Topic and the batch id as Correlation Data. An entry is synced when the
head-end's application ack names it, never on the broker's PUBACK. A bounded window of
batches is in flight; it is refilled from the journal as acks come, so paho's in-memory
queue never becomes the buffer (it holds at most the window, and a client is thrown
away with its queue when its connection ends). After any reconnect, or when acks stop
coming, everything unacknowledged is sent again from the journal: re-sending is
harmless, the head-end dedupes on the entry uuid. A batch is read from the journal
already encoded (:meth:`Journal.unacked_wire`: SQLite writes the entries' JSON, byte for
byte what ``contract.Batch(...).encode()`` would), and an ack is recorded by the journal
ids of the uuids it names, which this gate read with them.

One thread runs :meth:`Uplink.run` (the daemon supervises it); the connection, its
reconnecting and its Last Will are daemon.sync.link's, whose paho thread hands acks
over through a queue. The card loop never touches MQTT: a tap only ever waits for its
own journal commit, and an ack commit holds the journal's writer lock no longer than
one append does.

Operators' commands (``.../cmd``, ``tapgate/v1/fleet/cmd``) and the desired state
(``.../desired``) come in on the same connection: paho's thread hands them, unread, to
``on_command`` (daemon.sync.commands queues them for its own thread), and answers go
out through :meth:`BrokerLink.publish`. While connected the gate's retained ``online``
status (with telemetry) and its public info are published here.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from daemon.config import MqttConfig
from daemon.journal import Journal
from daemon.journal.store import Outgoing
from daemon.outcome import TapResult
from daemon.sync.link import BrokerLink, Connection
from protocol import contract
from protocol.command import Incoming
from protocol.mqtt import publish_properties

log = logging.getLogger("tapgate.sync")

POLL_S = 0.25  # the longest the outbox goes unlooked-at when nothing wakes the uplink
RESCAN_S = 1.0  # how often the journal itself is asked for entries past the cursor
REMEMBER_BATCHES = 1024  # batch id -> uuids sent, so that a late ack still counts
ACK_WAIT_MAX_S = 600.0  # acks overdue again and again (head-end away): resend this seldom


@dataclass
class UplinkStats:
    connects: int = 0
    batches_sent: int = 0
    entries_sent: int = 0
    entries_acked: int = 0
    resends: int = 0  # times the window was sent again from the journal (acks overdue)

    def to_json(self) -> dict[str, int]:
        return {"connects": self.connects, "batches_sent": self.batches_sent,
                "entries_sent": self.entries_sent, "entries_acked": self.entries_acked,
                "resends": self.resends}


@dataclass(frozen=True, slots=True)
class SyncNow:
    """An operator's sync_now (GateControl.sync_now): the journal read now, not at the
    next rescan; answers what is left to send and whether the broker is there."""

    journal: Journal
    link: BrokerLink

    def __call__(self) -> dict[str, Any]:
        self.link.wakeup.sync_now()
        return {"pending_sync": self.journal.pending_sync_count(),
                "connected": self.link.connected}


class Uplink:
    """Drains the journal's outbox over a :class:`BrokerLink` (a :class:`Session` of it);
    publishes the gate's status and info, and hands operators' commands to
    ``on_command``."""

    def __init__(self, *, config: MqttConfig, gate_id: str, journal: Journal,
                 link: BrokerLink | None = None,  # None: one of its own, from config
                 telemetry: Callable[[], dict[str, Any]] | None = None,
                 info: Callable[[], dict[str, Any]] | None = None,
                 on_command: Callable[[Incoming], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._cfg = config
        self.gate_id = gate_id
        self._link = link if link is not None else BrokerLink(config=config, gate_id=gate_id,
                                                              clock=clock)
        self._wakeup = self._link.wakeup
        self._journal = journal
        self._telemetry = telemetry  # the status's content, read in the uplink's thread
        # the gate's public info, retained on .../info: sent on connect and when it changes
        self._info = info
        self._info_sent = b""
        self._info_topic = contract.info_topic(gate_id)
        self._clock = clock
        self._mono = monotonic  # every wait and timeout here: never the wall clock
        self._tx_topic = contract.tx_topic(gate_id)
        self._ack_topic = contract.ack_topic(gate_id)
        self._status_topic = contract.status_topic(gate_id)
        # commands and the desired state, handed over as they come
        self._on_command = on_command
        self._command_topics = (contract.cmd_topic(gate_id), contract.fleet_cmd_topic(),
                                contract.desired_topic(gate_id))
        self._acks: queue.SimpleQueue[contract.Ack] = queue.SimpleQueue()
        self._boot = secrets.token_hex(4)  # batch ids are unique across restarts
        self._batch_seq = itertools.count(1)
        # batches sent, across reconnects: an ack names a batch, and only what this gate
        # sent in it is marked synced (journal ids and uuids, in the same order)
        self._sent: collections.OrderedDict[str, tuple[list[int], list[str]]] = (
            collections.OrderedDict())
        self._inflight: dict[str, float] = {}  # batch id -> when sent, this connection
        self._cursor = 0  # the last entry id sent on this connection
        # None: due now. A monotonic clock's reading means nothing by itself (it may be
        # small on a machine just booted): never compare it with 0.
        self._rescan_at: float | None = None
        self._rewound_at: float | None = None
        self._ack_wait = config.ack_timeout_s  # doubles while no ack comes at all
        self.stats = UplinkStats()

    @property
    def client_id(self) -> str:
        return self._link.client_id

    @property
    def connected(self) -> bool:
        return self._link.connected

    def notify(self) -> None:
        """New entries are in the journal."""
        self._wakeup.ring()

    def observe_tap(self, result: TapResult, seconds: float) -> None:
        """A TapListener (daemon.loop): whatever the tap came to, the journal may have
        new entries. Never waits: the uplink's own thread reads them."""
        self.notify()

    def sync_now(self) -> None:
        """Look at the journal now, not at the next rescan (an operator's sync_now)."""
        self._wakeup.sync_now()

    def run(self, stop: threading.Event) -> None:
        """Connect, drain, reconnect, until ``stop`` is set. Runs in its own thread."""
        self._link.run(stop, self)

    # -- paho's thread -----------------------------------------------------------------
    def on_message(self, message: mqtt.MQTTMessage) -> None:
        if message.topic in self._command_topics:
            self._take_command(message)
            return
        if message.topic != self._ack_topic:
            return
        try:
            ack = contract.Ack.decode(bytes(message.payload))
        except Exception as err:  # whatever it is: raising here would end paho's thread
            log.warning("a malformed ack on %s was ignored: %r", message.topic, err)
            return
        if not ack.batch_id and message.properties is not None:
            correlation = getattr(message.properties, "CorrelationData", b"")
            ack = contract.Ack(bytes(correlation).decode(errors="replace"), ack.stored,
                               ack.problems)
        self._acks.put(ack)
        self._wakeup.ring()

    def _take_command(self, message: mqtt.MQTTMessage) -> None:
        """Hand a command over as it came: its size is checked before anything reads it."""
        if self._on_command is None:
            return
        props = message.properties
        response = str(getattr(props, "ResponseTopic", "") or "") if props else ""
        correlation = getattr(props, "CorrelationData", None) if props else None
        try:
            self._on_command(Incoming(topic=message.topic, payload=bytes(message.payload),
                                      response_topic=response,
                                      correlation=bytes(correlation) if correlation else None,
                                      retained=bool(message.retain)))
        except Exception:  # raising here would end paho's thread
            log.exception("taking a command from %s", message.topic)

    # -- one connection ----------------------------------------------------------------
    def serve(self, connection: Connection, stop: threading.Event) -> None:
        """One connection: drain, and say how the gate is, until it ends."""
        self.stats.connects += 1
        log.info("connected to the broker %s:%d as %s (%s session); %d entries to sync",
                 self._cfg.host, self._cfg.port, self.client_id,
                 "resumed" if connection.resumed else "new",
                 self._journal.pending_sync_count())
        # whatever was in flight on the last connection is sent again from the journal
        self._inflight.clear()
        self._cursor = 0
        self._rescan_at = None
        connection.subscribe([self._ack_topic])
        if self._on_command is not None:
            connection.subscribe(list(self._command_topics))
        self._send_status(connection)
        self._info_sent = b""  # a new connection: the broker may have lost the retained copy
        self._send_info(connection)
        next_status = self._mono() + self._cfg.status_interval_s
        while not stop.is_set() and connection.up:
            self._wakeup.clear()
            if self._wakeup.take_sync_now():
                self._rescan_at = None
            self._take_acks()
            now = self._mono()
            self._expire(now)
            self._fill(connection, now)
            if now >= next_status:
                self._send_status(connection)
                self._send_info(connection)
                next_status = now + self._cfg.status_interval_s
            self._wakeup.wait(POLL_S)

    def _fill(self, connection: Connection, now: float) -> None:
        """Top the window up with the next unacknowledged entries, in id order."""
        while len(self._inflight) < self._cfg.window and connection.up:
            # the card loop's appends move tail_id; a periodic look covers other writers
            if (self._journal.tail_id <= self._cursor and self._rescan_at is not None
                    and now < self._rescan_at):
                return
            entries = self._journal.unacked_wire(self._cursor, self._cfg.batch_size)
            if entries is None:
                self._rescan_at = now + RESCAN_S
                self._rewind_if_left_out(now)
                return
            if not self._publish(connection, entries):
                return

    def _publish(self, connection: Connection, entries: Outgoing) -> bool:
        """Send one batch (entries in their export form, as the head-end stores them)."""
        batch_id = f"{self._boot}-{next(self._batch_seq)}"
        payload = contract.Batch.wrap(self.gate_id, batch_id, entries.json)
        rc = connection.publish(self._tx_topic, payload, properties=publish_properties(
            response_topic=self._ack_topic, correlation=batch_id.encode()))
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # the connection just went: nothing counts as sent, the journal still has it
            log.debug("batch %s not sent: %s", batch_id, mqtt.error_string(rc))
            return False
        self._cursor = entries.ids[-1]
        self._inflight[batch_id] = self._mono()
        self._sent[batch_id] = (entries.ids, entries.uuids)
        while len(self._sent) > REMEMBER_BATCHES:
            self._sent.popitem(last=False)
        self.stats.batches_sent += 1
        self.stats.entries_sent += len(entries.ids)
        return True

    def _take_acks(self) -> None:
        """Mark what the head-end stored, from every ack that came: one journal commit,
        by the journal ids of the uuids each ack names."""
        synced: list[int] = []
        while True:
            try:
                ack = self._acks.get_nowait()
            except queue.Empty:
                break
            self._inflight.pop(ack.batch_id, None)
            self._ack_wait = self._cfg.ack_timeout_s  # a head-end is there
            sent = self._sent.pop(ack.batch_id, None)
            if sent is None:  # sent before a restart, or forgotten: it will be sent again
                log.debug("ack for batch %r, which this gate does not know: ignored",
                          ack.batch_id)
                continue
            ids, uuids = sent
            stored = set(ack.stored)
            if stored.issuperset(uuids):
                synced += ids
            else:
                mine = [i for i, u in zip(ids, uuids, strict=True) if u in stored]
                log.warning("head-end stored %d of the %d entries of batch %s; the rest "
                            "stay pending", len(mine), len(ids), ack.batch_id)
                synced += mine
            for uuid, why in ack.problems.items():
                log.warning("head-end flags entry %s: %s", uuid, why)
        if synced:
            self.stats.entries_acked += self._journal.mark_acked_ids(synced)

    def _expire(self, now: float) -> None:
        """Acks overdue (head-end away, a message lost): send the window again, waiting
        twice as long each time none comes, so an absent head-end's queue at the broker
        does not fill with copies."""
        if not self._inflight:
            return
        oldest = min(self._inflight.values())
        if now - oldest < self._ack_wait:
            return
        log.warning("no ack for %d batches in %.0f s: sending again from the journal",
                    len(self._inflight), now - oldest)
        self._inflight.clear()
        self._cursor = 0
        self._ack_wait = min(self._ack_wait * 2, max(ACK_WAIT_MAX_S, self._cfg.ack_timeout_s))
        self.stats.resends += 1

    def _rewind_if_left_out(self, now: float) -> None:
        """Everything past the cursor is sent and nothing is in flight, yet an earlier
        entry is still pending (an ack left it out): go back for it, now and then."""
        if self._inflight or (self._rewound_at is not None
                              and now - self._rewound_at < self._cfg.ack_timeout_s):
            return
        first = self._journal.unacked(0, 1)
        if first and first[0].id <= self._cursor:
            self._rewound_at = now
            self._cursor = first[0].id - 1
            self._rescan_at = None
            self.stats.resends += 1

    def _send_status(self, connection: Connection) -> None:
        telemetry: dict[str, Any] = {}
        if self._telemetry is not None:
            try:
                telemetry = dict(self._telemetry())
            except Exception:  # telemetry must never stop the sync
                log.exception("collecting telemetry")
        telemetry["uplink"] = self.stats.to_json()
        status = contract.Status(self.gate_id, contract.ONLINE, self._now_ms(), telemetry)
        connection.publish(self._status_topic, status.encode(), retain=True)

    def _send_info(self, connection: Connection) -> None:
        """The retained info, when it says something new (its timestamp aside)."""
        if self._info is None:
            return
        try:
            info = dict(self._info())
        except Exception:  # the info must never stop the sync
            log.exception("collecting the gate's info")
            return
        content = contract.canonical({k: v for k, v in info.items() if k != "ts_ms"})
        if content == self._info_sent:
            return
        rc = connection.publish(self._info_topic, contract.canonical(info), retain=True)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._info_sent = content

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)
