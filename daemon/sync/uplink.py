"""The uplink: the journal is the outbox, the head-end's ack the only proof of sync.

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

One thread runs :meth:`Uplink.run` (the daemon supervises it); paho's network loop runs
in its own thread per connection (``loop_start``) and hands acks over through a queue.
The card loop never touches MQTT: a tap only ever waits for its own journal commit, and
an ack commit holds the journal's writer lock no longer than one append does.

Operators' commands (``.../cmd``, ``tapgate/v1/fleet/cmd``) and the desired state
(``.../desired``) come in on the same connection: paho's thread hands them, unread, to
``on_command`` (daemon.sync.commands queues them for its own thread), and answers go
out through :meth:`Uplink.publish`.

Reconnecting is this module's loop, not paho's (``reconnect_on_failure=False``):
exponential backoff with jitter, a persistent session (clean start off, session expiry
set), a retained ``online`` status with telemetry on connect and a retained ``offline``
Last Will.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from daemon.config import MqttConfig
from daemon.journal import Journal
from daemon.journal.store import Outgoing
from daemon.sync.backoff import Backoff
from protocol import contract
from protocol.command import Incoming
from protocol.errors import SyncError

log = logging.getLogger("tapgate.sync")

POLL_S = 0.25  # the longest the outbox goes unlooked-at when nothing wakes the uplink
RESCAN_S = 1.0  # how often the journal itself is asked for entries past the cursor
CONNACK_TIMEOUT_S = 15.0
STOP_PUBLISH_TIMEOUT_S = 2.0  # on a clean stop: how long the offline status may take
HEALTHY_AFTER_S = 30.0  # a connection that lasted this long resets the backoff
REMEMBER_BATCHES = 1024  # batch id -> uuids sent, so that a late ack still counts
SPARE_SLOTS = 4  # paho's queue: the window plus status messages
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


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


class _Link:
    """One connection's state, shared with paho's callbacks (its userdata)."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.ended = threading.Event()  # refused, failed or lost
        self.changed = threading.Event()
        self.reason = ""
        self.resumed = False  # the broker still had our session
        self.refused = 0  # publishes the broker refused (PUBACK with an error)


class Uplink:
    def __init__(self, *, config: MqttConfig, gate_id: str, journal: Journal,
                 telemetry: Callable[[], dict[str, Any]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._cfg = config
        self.gate_id = gate_id
        self.client_id = config.client_id or gate_id
        self._journal = journal
        self.telemetry = telemetry  # the status's content, read in the uplink's thread
        # the gate's public info, retained on .../info: sent on connect and when it changes
        self.info: Callable[[], dict[str, Any]] | None = None
        self._info_sent = b""
        self._info_topic = contract.info_topic(gate_id)
        self._clock = clock
        self._tx_topic = contract.tx_topic(gate_id)
        self._ack_topic = contract.ack_topic(gate_id)
        self._status_topic = contract.status_topic(gate_id)
        # commands and the desired state: handed to on_command (set it before run())
        self.on_command: Callable[[Incoming], None] | None = None
        self._command_topics = (contract.cmd_topic(gate_id), contract.fleet_cmd_topic(),
                                contract.desired_topic(gate_id))
        self._current: mqtt.Client | None = None  # the connected client, for publish()
        self._wake = threading.Event()
        self._acks: queue.SimpleQueue[contract.Ack] = queue.SimpleQueue()
        self._boot = secrets.token_hex(4)  # batch ids are unique across restarts
        self._batch_seq = itertools.count(1)
        # batches sent, across reconnects: an ack names a batch, and only what this gate
        # sent in it is marked synced (journal ids and uuids, in the same order)
        self._sent: collections.OrderedDict[str, tuple[list[int], list[str]]] = (
            collections.OrderedDict())
        self._inflight: dict[str, float] = {}  # batch id -> when sent, this connection
        self._cursor = 0  # the last entry id sent on this connection
        self._rescan_at = 0.0
        self._rewound_at = 0.0
        self._ack_wait = config.ack_timeout_s  # doubles while no ack comes at all
        self._link: _Link | None = None
        self.stats = UplinkStats()

    @property
    def connected(self) -> bool:
        link = self._link
        return link is not None and link.connected.is_set()

    def notify(self) -> None:
        """New entries are in the journal (the card loop calls this after a tap)."""
        self._wake.set()

    def sync_now(self) -> None:
        """Look at the journal now, not at the next rescan (an operator's sync_now)."""
        self._rescan_at = 0.0
        self._wake.set()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                correlation: bytes | None = None) -> bool:
        """Publish on the current connection (QoS 1), from any thread: a command's answer,
        the reported state. False when there is no connection: nothing is queued."""
        client, link = self._current, self._link
        if client is None or link is None or not link.connected.is_set():
            return False
        props = _properties(PacketTypes.PUBLISH)
        if correlation is not None:
            props.CorrelationData = correlation
        info = client.publish(topic, payload, qos=1, retain=retain, properties=props)
        return bool(info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS)

    # -- the connection loop -----------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Connect, drain, reconnect, until ``stop`` is set. Runs in its own thread."""
        backoff = Backoff(self._cfg.reconnect_min_s, self._cfg.reconnect_max_s)
        failures = 0
        while not stop.is_set():
            link = _Link()
            client = self._client(link)
            began = time.monotonic()
            try:
                if self._connect(client, link, stop):
                    self._current, self._link = client, link
                    failures = 0
                    self._session(client, link, stop)
            finally:
                self._current, self._link = None, None
                self._close(client, link, stopping=stop.is_set())
            if stop.is_set():
                return
            if time.monotonic() - began > HEALTHY_AFTER_S:
                backoff.reset()
            pause = backoff.next()
            failures += 1
            # the first failure in a row says so loudly; the retries of an outage quietly
            log.log(logging.WARNING if failures == 1 else logging.INFO,
                    "broker %s:%d: %s; next attempt in %.1f s", self._cfg.host,
                    self._cfg.port, link.reason or "disconnected", pause)
            stop.wait(pause)

    def _client(self, link: _Link) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5, userdata=link, reconnect_on_failure=False)
        client.max_inflight_messages_set(self._cfg.window + SPARE_SLOTS)
        client.max_queued_messages_set(self._cfg.window + SPARE_SLOTS)
        if self._cfg.uses_tls:
            cfg = self._cfg
            try:
                client.tls_set(ca_certs=str(cfg.tls_ca) if cfg.tls_ca else None,
                               certfile=str(cfg.tls_cert) if cfg.tls_cert else None,
                               keyfile=str(cfg.tls_key) if cfg.tls_key else None)
            except (OSError, ValueError) as err:
                raise SyncError(f"MQTT TLS setup (mqtt.tls_ca / tls_cert / tls_key): {err}"
                                ) from err
        will = contract.Status(self.gate_id, contract.OFFLINE, self._now_ms(),
                               {"reason": "connection lost"})
        client.will_set(self._status_topic, will.encode(), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _connect(self, client: mqtt.Client, link: _Link, stop: threading.Event) -> bool:
        props = _properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._cfg.session_expiry_s
        try:
            client.connect(self._cfg.host, self._cfg.port, keepalive=self._cfg.keepalive_s,
                           clean_start=False, properties=props)
        except (OSError, ValueError) as err:  # refused, unreachable, DNS, TLS handshake
            link.reason = f"cannot connect: {err}"
            return False
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # batches and acks are written whole: Nagle would only hold them back (with the
            # peer's delayed ACK, ~40 ms per round trip, the window's pace)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.loop_start()
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while not (link.connected.is_set() or link.ended.is_set() or stop.is_set()):
            if time.monotonic() > deadline:
                link.reason = "no CONNACK from the broker"
                return False
            link.changed.wait(0.1)
            link.changed.clear()
        return link.connected.is_set()

    def _close(self, client: mqtt.Client, link: _Link, *, stopping: bool) -> None:
        if stopping and link.connected.is_set():
            # a clean stop sends no Last Will: say offline ourselves
            info = client.publish(self._status_topic, contract.Status(
                self.gate_id, contract.OFFLINE, self._now_ms(), {"reason": "stopped"}
            ).encode(), qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):  # not sent: the will says it
                info.wait_for_publish(STOP_PUBLISH_TIMEOUT_S)
        client.disconnect()
        client.loop_stop()

    # -- paho's thread -----------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, link: _Link, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            link.reason = f"connection refused: {reason}"
            link.ended.set()
        else:
            link.resumed = bool(flags.session_present)
            link.connected.set()
        link.changed.set()
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, link: _Link,
                       flags: mqtt.DisconnectFlags, reason: ReasonCode,
                       properties: Properties | None) -> None:
        if link.connected.is_set():
            link.reason = f"connection lost: {reason}"
        elif not link.reason:
            link.reason = f"connection failed: {reason}"
        link.connected.clear()
        link.ended.set()
        link.changed.set()
        self._wake.set()

    def _on_publish(self, client: mqtt.Client, link: _Link, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            link.refused += 1
            if link.refused == 1:  # the batch stays pending; say why once per connection
                log.error("the broker refuses what this gate publishes (%s): check "
                          "mqtt.client_id, the client certificate and the broker's ACL for "
                          "%s", reason, self._tx_topic)

    def _on_message(self, client: mqtt.Client, link: _Link, message: mqtt.MQTTMessage) -> None:
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
        self._wake.set()

    def _take_command(self, message: mqtt.MQTTMessage) -> None:
        """Hand a command over as it came: its size is checked before anything reads it."""
        if self.on_command is None:
            return
        props = message.properties
        response = str(getattr(props, "ResponseTopic", "") or "") if props else ""
        correlation = getattr(props, "CorrelationData", None) if props else None
        try:
            self.on_command(Incoming(topic=message.topic, payload=bytes(message.payload),
                                     response_topic=response,
                                     correlation=bytes(correlation) if correlation else None,
                                     retained=bool(message.retain)))
        except Exception:  # raising here would end paho's thread
            log.exception("taking a command from %s", message.topic)

    # -- one connection ----------------------------------------------------------------
    def _session(self, client: mqtt.Client, link: _Link, stop: threading.Event) -> None:
        self.stats.connects += 1
        log.info("connected to the broker %s:%d as %s (%s session); %d entries to sync",
                 self._cfg.host, self._cfg.port, self.client_id,
                 "resumed" if link.resumed else "new", self._journal.pending_sync_count())
        # whatever was in flight on the last connection is sent again from the journal
        self._inflight.clear()
        self._cursor = 0
        self._rescan_at = 0.0
        client.subscribe(self._ack_topic, qos=1)
        if self.on_command is not None:
            client.subscribe([(t, 1) for t in self._command_topics])
        self._send_status(client)
        self._info_sent = b""  # a new connection: the broker may have lost the retained copy
        self._send_info(client)
        next_status = time.monotonic() + self._cfg.status_interval_s
        while not stop.is_set() and link.connected.is_set():
            self._wake.clear()
            self._take_acks()
            now = time.monotonic()
            self._expire(now)
            self._fill(client, link, now)
            if now >= next_status:
                self._send_status(client)
                self._send_info(client)
                next_status = now + self._cfg.status_interval_s
            self._wake.wait(POLL_S)

    def _fill(self, client: mqtt.Client, link: _Link, now: float) -> None:
        """Top the window up with the next unacknowledged entries, in id order."""
        while len(self._inflight) < self._cfg.window and link.connected.is_set():
            # the card loop's appends move tail_id; a periodic look covers other writers
            if self._journal.tail_id <= self._cursor and now < self._rescan_at:
                return
            entries = self._journal.unacked_wire(self._cursor, self._cfg.batch_size)
            if entries is None:
                self._rescan_at = now + RESCAN_S
                self._rewind_if_left_out(now)
                return
            if not self._publish(client, entries):
                return

    def _publish(self, client: mqtt.Client, entries: Outgoing) -> bool:
        """Send one batch (entries in their export form, as the head-end stores them)."""
        batch_id = f"{self._boot}-{next(self._batch_seq)}"
        payload = contract.Batch.wrap(self.gate_id, batch_id, entries.json)
        props = _properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self._ack_topic
        props.CorrelationData = batch_id.encode()
        info = client.publish(self._tx_topic, payload, qos=1, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # the connection just went: nothing counts as sent, the journal still has it
            log.debug("batch %s not sent: %s", batch_id, mqtt.error_string(info.rc))
            return False
        self._cursor = entries.ids[-1]
        self._inflight[batch_id] = time.monotonic()
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
        if self._inflight or now - self._rewound_at < self._cfg.ack_timeout_s:
            return
        first = self._journal.unacked(0, 1)
        if first and first[0].id <= self._cursor:
            self._rewound_at = now
            self._cursor = first[0].id - 1
            self._rescan_at = 0.0
            self.stats.resends += 1

    def _send_status(self, client: mqtt.Client) -> None:
        telemetry: dict[str, Any] = {}
        if self.telemetry is not None:
            try:
                telemetry = dict(self.telemetry())
            except Exception:  # telemetry must never stop the sync
                log.exception("collecting telemetry")
        telemetry["uplink"] = self.stats.to_json()
        status = contract.Status(self.gate_id, contract.ONLINE, self._now_ms(), telemetry)
        client.publish(self._status_topic, status.encode(), qos=1, retain=True)

    def _send_info(self, client: mqtt.Client) -> None:
        """The retained info, when it says something new (its timestamp aside)."""
        if self.info is None:
            return
        try:
            info = dict(self.info())
        except Exception:  # the info must never stop the sync
            log.exception("collecting the gate's info")
            return
        content = contract.canonical({k: v for k, v in info.items() if k != "ts_ms"})
        if content == self._info_sent:
            return
        result = client.publish(self._info_topic, contract.canonical(info), qos=1, retain=True)
        if result.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._info_sent = content

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)
