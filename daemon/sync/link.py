"""The gate's connection to the broker: connect, TLS, Last Will, back-off, reconnect.

Reconnecting is this module's loop, not paho's (``reconnect_on_failure=False``):
exponential backoff with jitter, a persistent session (clean start off, session expiry
set), a retained ``offline`` status as the Last Will, and said by the gate itself when
it stops cleanly (a clean disconnect sends no Will). What is done while a connection
lasts is a :class:`Session`'s (daemon.sync.uplink drains the outbox): :meth:`BrokerLink.run`
hands it each connection in turn, and paho's thread hands it every message.

paho's network loop runs in its own thread per connection (``loop_start``); a client is
thrown away with its connection, and with it whatever paho still had queued.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from daemon.config import MqttConfig
from daemon.sync.backoff import Backoff
from protocol import contract
from protocol import mqtt as transport
from protocol.errors import SyncError

log = logging.getLogger("tapgate.sync")

CONNACK_TIMEOUT_S = 15.0
STOP_PUBLISH_TIMEOUT_S = 2.0  # on a clean stop: how long the offline status may take
HEALTHY_AFTER_S = 30.0  # a connection that lasted this long resets the backoff
SPARE_SLOTS = 4  # paho's queue: the outbox's window plus status messages
# ... plus, apart from both, what BrokerLink.publish sends (commands' answers, the
# reported state): they wait for a slot of their own while connected, never take the
# outbox's, and are never dropped for want of room.
ANSWER_SLOTS = 8
ROOM_POLL_S = 0.1  # a slot is looked for at least this often (PUBACKs also wake it)


class Wakeup:
    """What the uplink's thread waits on between two looks at the outbox, rung from any
    thread: by the card loop after a tap (entries journalled), paho's (a connection came
    or went, an ack came), an operator's sync_now (which also asks for the journal
    itself to be read, not only past what the card loop's appends moved)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._read_journal = False

    def ring(self) -> None:
        self._event.set()

    def sync_now(self) -> None:
        with self._lock:
            self._read_journal = True
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def wait(self, timeout: float) -> None:
        self._event.wait(timeout)

    def take_sync_now(self) -> bool:
        """Whether sync_now was asked for since the last call."""
        with self._lock:
            asked, self._read_journal = self._read_journal, False
        return asked


class _State:
    """One connection's state, shared with paho's callbacks (its userdata)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.connected = threading.Event()
        self.ended = threading.Event()  # refused, failed or lost
        self.changed = threading.Event()
        self.reason = ""
        self.resumed = False  # the broker still had our session
        self.refused = 0  # publishes the broker refused (PUBACK with an error)
        self.room = threading.Event()  # a PUBACK came: a slot may be free
        self.answers: list[mqtt.MQTTMessageInfo] = []  # BrokerLink.publish's, unacked


class Connection:
    """One connection to the broker, as the uplink's thread uses it while it lasts."""

    def __init__(self, client: mqtt.Client, state: _State) -> None:
        self._client = client
        self._state = state

    @property
    def up(self) -> bool:
        return self._state.connected.is_set()

    @property
    def resumed(self) -> bool:
        """The broker still had this gate's session (and what it had queued for it)."""
        return self._state.resumed

    def subscribe(self, topics: list[str]) -> None:
        """QoS 1, in one SUBSCRIBE."""
        if len(topics) == 1:
            self._client.subscribe(topics[0], qos=1)
        else:
            self._client.subscribe([(t, 1) for t in topics])

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                properties: Properties | None = None) -> MQTTErrorCode:
        """QoS 1; what paho said (MQTT_ERR_SUCCESS: handed to its queue)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        return info.rc


class Session(Protocol):
    """What a connection is for (the outbox's drain, the commands' arrival)."""

    def on_message(self, message: mqtt.MQTTMessage) -> None:
        """In paho's thread: hand over, never wait, never raise (it would end the
        thread)."""

    def serve(self, connection: Connection, stop: threading.Event) -> None:
        """In the uplink's thread, from the CONNACK until the connection ends or
        ``stop`` is set."""


class BrokerLink:
    """The gate's one connection to the broker at a time, made again after each loss;
    what it publishes from outside its thread goes on the connection there is (waiting
    for a slot of its own while it lasts), or not at all."""

    def __init__(self, *, config: MqttConfig, gate_id: str, wakeup: Wakeup | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._cfg = config
        self.gate_id = gate_id
        self.client_id = config.client_id or gate_id
        self.wakeup = wakeup if wakeup is not None else Wakeup()
        self._clock = clock
        self._status_topic = contract.status_topic(gate_id)
        self._tx_topic = contract.tx_topic(gate_id)
        self._current: mqtt.Client | None = None  # the connected client, for publish()
        self._state: _State | None = None
        self._publishing = threading.Lock()  # publish()'s slots are counted one at a time

    @property
    def address(self) -> str:
        return f"{self._cfg.host}:{self._cfg.port}"

    @property
    def connected(self) -> bool:
        state = self._state
        return state is not None and state.connected.is_set()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                correlation: bytes | None = None) -> bool:
        """Publish on the current connection (QoS 1), from any thread: a command's answer,
        the reported state. While connected it waits for one of the ANSWER_SLOTS (the
        broker's PUBACKs free them); False when there is no connection: nothing is
        queued."""
        props = transport.publish_properties(correlation=correlation)
        with self._publishing:
            while True:
                client, state = self._current, self._state
                if client is None or state is None or not state.connected.is_set():
                    return False
                state.room.clear()  # before looking: a PUBACK from now on wakes the wait
                state.answers = [i for i in state.answers if not i.is_published()]
                if len(state.answers) < ANSWER_SLOTS:
                    info = client.publish(topic, payload, qos=1, retain=retain,
                                          properties=props)
                    if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                        state.answers.append(info)
                        return True
                    if info.rc != MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                        return False  # the connection just went
                state.room.wait(ROOM_POLL_S)

    def run(self, stop: threading.Event, session: Session) -> None:
        """Connect, serve ``session``, reconnect, until ``stop`` is set. Runs in its own
        thread."""
        backoff = Backoff(self._cfg.reconnect_min_s, self._cfg.reconnect_max_s)
        failures = 0
        while not stop.is_set():
            state = _State(session)
            client = self._client(state)
            began = time.monotonic()
            try:
                if self._connect(client, state, stop):
                    self._current, self._state = client, state
                    failures = 0
                    session.serve(Connection(client, state), stop)
            finally:
                self._current, self._state = None, None
                self._close(client, state, stopping=stop.is_set())
            if stop.is_set():
                return
            if time.monotonic() - began > HEALTHY_AFTER_S:
                backoff.reset()
            pause = backoff.next()
            failures += 1
            # the first failure in a row says so loudly; the retries of an outage quietly
            log.log(logging.WARNING if failures == 1 else logging.INFO,
                    "broker %s:%d: %s; next attempt in %.1f s", self._cfg.host,
                    self._cfg.port, state.reason or "disconnected", pause)
            stop.wait(pause)

    def _client(self, state: _State) -> mqtt.Client:
        cfg = self._cfg
        tls = transport.TlsFiles(cfg.tls_ca, cfg.tls_cert, cfg.tls_key) if cfg.uses_tls else None
        try:
            client = transport.new_client(self.client_id, tls=tls, userdata=state,
                                          reconnect_on_failure=False)
        except (OSError, ValueError) as err:
            raise SyncError(f"MQTT TLS setup (mqtt.tls_ca / tls_cert / tls_key): {err}"
                            ) from err
        client.max_inflight_messages_set(cfg.window + SPARE_SLOTS + ANSWER_SLOTS)
        client.max_queued_messages_set(cfg.window + SPARE_SLOTS + ANSWER_SLOTS)
        will = contract.Status(self.gate_id, contract.OFFLINE, self._now_ms(),
                               {"reason": "connection lost"})
        client.will_set(self._status_topic, will.encode(), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _connect(self, client: mqtt.Client, state: _State, stop: threading.Event) -> bool:
        try:
            client.connect(self._cfg.host, self._cfg.port, keepalive=self._cfg.keepalive_s,
                           clean_start=False, properties=transport.connect_properties(
                               session_expiry_s=self._cfg.session_expiry_s))
        except (OSError, ValueError) as err:  # refused, unreachable, DNS, TLS handshake
            state.reason = f"cannot connect: {err}"
            return False
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # batches and acks are written whole: Nagle would only hold them back (with the
            # peer's delayed ACK, ~40 ms per round trip, the window's pace)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.loop_start()
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while not (state.connected.is_set() or state.ended.is_set() or stop.is_set()):
            if time.monotonic() > deadline:
                state.reason = "no CONNACK from the broker"
                return False
            state.changed.wait(0.1)
            state.changed.clear()
        return state.connected.is_set()

    def _close(self, client: mqtt.Client, state: _State, *, stopping: bool) -> None:
        if stopping and state.connected.is_set():
            # a clean stop sends no Last Will: say offline ourselves
            info = client.publish(self._status_topic, contract.Status(
                self.gate_id, contract.OFFLINE, self._now_ms(), {"reason": "stopped"}
            ).encode(), qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):  # not sent: the will says it
                info.wait_for_publish(STOP_PUBLISH_TIMEOUT_S)
        client.disconnect()
        client.loop_stop()

    # -- paho's thread -----------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, state: _State, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            state.reason = f"connection refused: {reason}"
            state.ended.set()
        else:
            state.resumed = bool(flags.session_present)
            state.connected.set()
        state.changed.set()
        self.wakeup.ring()

    def _on_disconnect(self, client: mqtt.Client, state: _State,
                       flags: mqtt.DisconnectFlags, reason: ReasonCode,
                       properties: Properties | None) -> None:
        if state.connected.is_set():
            state.reason = f"connection lost: {reason}"
        elif not state.reason:
            state.reason = f"connection failed: {reason}"
        state.connected.clear()
        state.ended.set()
        state.changed.set()
        state.room.set()  # a publisher waiting for a slot: there is no connection now
        self.wakeup.ring()

    def _on_publish(self, client: mqtt.Client, state: _State, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        state.room.set()
        if reason.is_failure:
            state.refused += 1
            if state.refused == 1:  # the batch stays pending; say why once per connection
                log.error("the broker refuses what this gate publishes (%s): check "
                          "mqtt.client_id, the client certificate and the broker's ACL for "
                          "%s", reason, self._tx_topic)

    @staticmethod
    def _on_message(client: mqtt.Client, state: _State, message: mqtt.MQTTMessage) -> None:
        state.session.on_message(message)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)
