"""`tapgate-headend run`: take the gates' batches off the shared subscription, store them,
then acknowledge them; check them after.

The order is the whole point: commit the batch, then publish the application ack (to the
batch's Response Topic, with its Correlation Data, QoS 1), then PUBACK the batch to the
broker (manual ack). A head-end that dies anywhere before the ack leaves the batch
unacknowledged; the gate sends it again and the store's dedupe makes that harmless.

What is checked before the ack: that each entry is one (a uuid; the rest is kept aside),
dedupe on the uuid, and the chain link to the gate's previous entry; and, for a gate
whose device key the head-end has, that the entry is the gate's own (hash, signature,
and TAC with them): an ack must never name a copy someone else published on the gate's
topic, or the gate would take it as stored and prune its own (:mod:`headend.store`).
The entries of gates without a key have their hash, signature and TAC checked after the
ack by verifying processes (:mod:`headend.verdicts`): a gate draining a backlog waits
for acks, not for verdicts. Until its verdicts are written an
entry's hash, signature and TAC read ``pending`` (in the database, ``export`` and
``gates``), and the ack's ``problems`` name only what was found before it (a broken
chain, a reused id, a uuid stored with other content); a resend's ack names what is
stored by then. The pending entries are in the database, so none is left unchecked by a
stop or a crash. ``verify_after_ack=False`` checks everything before the ack instead.

paho's network thread only queues messages; one worker (the caller's thread) stores and
acknowledges them in arrival order, so a slow database never stalls keepalives. The
queue is bounded by the Receive Maximum the head-end announces: the broker holds the rest.
Several instances on ``$share/headend/...`` split the gates' batches between them; they
must share one database (the chain of a gate spans the batches every instance gets).

The gates' retained info (``tapgate/v1/+/info``, not shared: every instance gets every
gate's, and the newest wins in the database) feeds the beacon directory
(:mod:`headend.beacons`) on the same worker; a malformed one is refused and logged.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from headend.beacons import STORED, BeaconDirectory
from headend.mqtt import Broker, new_client
from headend.store import Store, StoreError
from headend.verdicts import VerifyingProcesses
from headend.verify import Verifier, printable
from protocol import contract
from protocol.mqtt import connect_properties, publish_properties

log = logging.getLogger("tapgate.headend")

RECEIVE_MAXIMUM = 64  # batches in flight to one instance, unacked
# The broker drops anything bigger on its way here. A gate's batch is at most 10,000
# entries (mqtt.batch_size) of about 700 bytes: 16 MiB leaves twice that.
MAXIMUM_PACKET_SIZE = 16 * 1024 * 1024
MAX_BATCH_ENTRIES = 10_000
# one per core (up to 8), niced: the checks take what storing and acknowledging leave
VERIFYING_PROCESSES = min(8, os.cpu_count() or 1)
CHECK_PROCESSES_S = 1.0
INFO_SUBSCRIPTION = contract.info_topic("+")


class Consumer:
    def __init__(self, *, store: Store, verifier: Verifier, broker: Broker, client_id: str,
                 subscription: str = contract.HEADEND_SHARE,
                 info_subscription: str | None = INFO_SUBSCRIPTION,
                 directory: BeaconDirectory | None = None,
                 verify_after_ack: bool = True,
                 verifying_processes: int = VERIFYING_PROCESSES,
                 crash_after_store: int | None = None) -> None:
        self.store = store
        self.verifier = verifier
        # not for a database no other process can open
        self._verify_after_ack = verify_after_ack and ":memory:" not in store.url
        self._verifying_processes = verifying_processes
        self._verifying: VerifyingProcesses | None = None  # running: verdicts after the ack
        self.broker = broker
        self.client_id = client_id
        self.subscription = subscription
        # None: batches only, no beacon directory
        self.info_subscription = info_subscription
        self.directory = directory
        # TEST HOOK ONLY (--test-crash-after-store): SIGKILL this process right after the
        # N-th batch is committed and before it is acknowledged.
        self._crash_after_store = crash_after_store
        self._inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.batches = 0
        self.entries = 0
        self.infos = 0  # gate infos stored into the beacon directory

    # -- paho's thread -----------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            log.error("%s refused the connection: %s", self.broker, reason)
            return
        log.info("connected to %s as %s", self.broker, self.client_id)
        client.subscribe([(t, SubscribeOptions(qos=1)) for t in self._subscriptions()])

    def _subscriptions(self) -> list[str]:
        return [self.subscription] + ([self.info_subscription] if self.info_subscription
                                      else [])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reasons: list[ReasonCode], properties: Any) -> None:
        if any(r.is_failure for r in reasons):
            log.error("subscription to %s refused: %s", " and ".join(self._subscriptions()),
                      ", ".join(str(r) for r in reasons))
            return
        log.info("ready: subscribed to %s", " and ".join(self._subscriptions()))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason: ReasonCode, properties: Any) -> None:
        if reason.is_failure or reason.value != 0:
            log.warning("disconnected from %s: %s; reconnecting", self.broker, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put(msg)

    # -- the worker --------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; then disconnect. Batches not yet acknowledged
        stay with their gates, which send them again."""
        if self.info_subscription and self.directory is None:
            self.directory = BeaconDirectory(self.store.db)
        if self.directory is not None:
            self.directory.open()
        client = new_client(self.broker, self.client_id, manual_ack=True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.connect_async(self.broker.host, self.broker.port, self.broker.keepalive,
                             clean_start=True,
                             properties=connect_properties(
                                 receive_maximum=RECEIVE_MAXIMUM,
                                 maximum_packet_size=MAXIMUM_PACKET_SIZE))
        client.loop_start()
        if self._verify_after_ack:
            self._verifying = VerifyingProcesses(url=self.store.url, verifier=self.verifier,
                                                 parts=self._verifying_processes)
            self._verifying.start()
        checked = time.monotonic()
        try:
            while not stop.is_set():
                if self._verifying is not None and time.monotonic() - checked > (
                        CHECK_PROCESSES_S):
                    self._verifying.check()
                    checked = time.monotonic()
                try:
                    msg = self._inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                self.handle(client, msg)
        finally:
            client.disconnect()
            client.loop_stop()
            if self._verifying is not None:
                self._verifying.stop()
                self._verifying = None
            log.info("stopped: %d batches, %d new entries stored, %d gate infos", self.batches,
                     self.entries, self.infos)

    def handle(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handle(client, msg)
        except StoreError as err:
            # Not acknowledged: the gate sends the batch again later.
            log.error("%s", err)
        except Exception as err:  # a message no gate should send: never the whole head-end
            log.exception("message on %s broke the head-end: kept aside, not acknowledged",
                          msg.topic)
            self._keep_aside(msg, f"it broke the head-end: {type(err).__name__}: {err}")
        finally:
            client.ack(msg.mid, msg.qos)

    def _keep_aside(self, msg: mqtt.MQTTMessage, why: str) -> None:
        try:
            self.store.reject_payload(gate=_gate_of(msg.topic), payload=bytes(msg.payload), why=why,
                                      stored_by=self.client_id)
        except StoreError as err:
            log.error("%s", err)

    def _handle(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        reply = self.take(msg.topic, bytes(msg.payload),
                          response=getattr(props, "ResponseTopic", None) if props else None,
                          correlation=getattr(props, "CorrelationData", None) if props else None)
        if reply is not None:
            client.publish(reply.topic, reply.ack.encode(), qos=1,
                           properties=publish_properties(correlation=reply.correlation))

    def take(self, topic: str, payload: bytes, *, response: str | None = None,
             correlation: bytes | None = None) -> Reply | None:
        """Store one message (a batch, or a gate's info); the ack to publish, if any."""
        gate = _gate_of(topic)
        if topic == contract.info_topic(gate):
            self._info(gate, payload)
            return None
        try:
            batch = contract.Batch.decode(payload)
            if len(batch.entries) > MAX_BATCH_ENTRIES:
                raise ValueError(f"{len(batch.entries)} entries, more than a gate sends "
                                 f"({MAX_BATCH_ENTRIES})")
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            log.warning("message on %s is not a batch (%s): kept aside, not acknowledged",
                        topic, printable(str(err)))
            self.store.reject_payload(gate=gate, payload=payload, why=f"not a batch: {err}",
                                      stored_by=self.client_id)
            return None
        notes = []
        if batch.gate != gate:
            notes.append(f"the batch says gate {batch.gate} but came on the topic of {gate}")
        stored = self.store.store_batch(gate=gate, batch_id=batch.batch_id,
                                        entries=batch.entries, verifier=self.verifier,
                                        after_ack=self._verifying is not None,
                                        stored_by=self.client_id, notes=notes)
        self.batches += 1
        self.entries += stored.new
        name = printable(batch.batch_id)  # what a log line (UTF-8) can hold
        log.info("batch %s of %s: %d new, %d already stored, %d rejected, %d suspect",
                 name, gate, stored.new, stored.duplicates, stored.rejected,
                 len(stored.problems))
        if self._crash_after_store is not None and self.batches >= self._crash_after_store:
            log.warning("test hook: killed after storing batch %s, before its ack", name)
            os.kill(os.getpid(), signal.SIGKILL)
        ack = contract.Ack(batch_id=batch.batch_id, stored=stored.stored,
                           problems=stored.problems)
        if not response or not response.startswith(contract.topic(gate, "")) or any(
                c in response for c in "+#"):
            # Answers go only under the gate's own topics (by contract its ack topic): a
            # batch must not make the head-end publish on another gate's topics.
            if response:
                log.warning("batch %s of %s asks for its ack on %s: sent to %s instead",
                            name, gate, response, contract.ack_topic(gate))
            response = contract.ack_topic(gate)
        return Reply(topic=response, ack=ack, correlation=correlation if correlation else
                     batch.batch_id.encode("utf-8", "surrogatepass"))

    def _info(self, gate: str, payload: bytes) -> None:
        """A gate's retained info: into the beacon directory (a malformed one is refused
        there, logged; it never stops the consumer)."""
        if self.directory is None:
            return
        try:
            outcome = self.directory.ingest(gate, payload)
        except StoreError:
            raise
        except Exception:  # untrusted input: a bug it finds must not stop the batches
            log.exception("info of %s refused: it broke the directory", gate)
            return
        self.infos += outcome == STORED


@dataclass(frozen=True, slots=True)
class Reply:
    """The ack of one batch: where it goes, and its correlation data."""

    topic: str
    ack: contract.Ack
    correlation: bytes


def _gate_of(topic: str) -> str:
    """The gate a message came from: its topic's gate level (tapgate/v1/<gate>/<leaf>),
    else the whole topic."""
    levels = topic.split("/")
    return levels[2] if len(levels) == 4 else topic
