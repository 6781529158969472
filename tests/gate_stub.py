"""A gate for the head-end's tests: real signed journal entries, sent per the contract.

:class:`SignedGate` is a real gate on the simulator (sim reader, virtual TGP1 cards with
PURSE.md's test keys, software SAM, a real SQLite journal) whose journal signs every
entry with an Ed25519 device key: its taps, tears and recoveries make the entries a
head-end receives, TACs computed by the cards themselves.

:class:`GateStub` is the uplink as protocol/contract.py has it, and no more: batches
of exported entries on ``tapgate/v1/<gate>/tx``, QoS 1, Response Topic = the gate's ack
topic, Correlation Data = the batch id; acks collected from the ack topic; unacked
batches sent again until acknowledged.
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from daemon.journal import Journal
from hal.card.model import Fault, FaultKind
from protocol import contract, devicekey
from protocol.entry import COMPLETED, KIND_DEBIT, Draft, chain_hash
from tests.cards import INS_DEBIT, STAFF, serial_of
from tests.configs import gate_config
from tests.rig import Rig

Entries = list[dict[str, Any]]


class SignedGate:
    """A gate on the simulator whose journal signs its entries with a device key."""

    def __init__(self, directory: Path, terminal_id: bytes, *,
                 key: Ed25519PrivateKey | None = None) -> None:
        self.key = key or Ed25519PrivateKey.generate()
        self.gate = terminal_id.hex().upper()
        directory.mkdir(parents=True, exist_ok=True)
        self.rig = Rig(directory, config=gate_config(terminal_id=terminal_id))
        self.rig.journal.close()
        self.rig.journal = Journal(self.rig.journal_path, clock=self.rig.clock,
                                   signer=self.key).open()
        self.rig.processor = self.rig._new_processor()
        base = int.from_bytes(terminal_id[-2:], "big") * 100
        self.adults = [self.rig.card(serial_of(base + n), 1_000_000) for n in range(4)]
        self.staff = self.rig.card(serial_of(base + 50), 0, card_type=STAFF)
        self.expired = self.rig.card(serial_of(base + 60), 5000, expiry=dt.date(2020, 1, 1))

    @property
    def public_hex(self) -> str:
        return devicekey.public_hex(self.key)

    def ride(self, taps: int) -> None:
        """``taps`` passengers: mostly adult debits, a free staff pass, a refused expired
        card, and a debit torn after the card applied it, recovered at the next tap."""
        for i in range(taps):
            self.rig.clock.advance(400)  # past the anti-passback window
            if i % 10 == 3:
                self.rig.tap(self.staff)
            elif i % 10 == 6:
                self.rig.tap(self.expired)
            elif i % 10 == 8:
                card = self.adults[i % len(self.adults)]
                card.inject(Fault(FaultKind.TEAR_AFTER, ins=INS_DEBIT))
                assert self.rig.tap(card).torn
                self.rig.tap(card)  # recovery/recovered: the card had debited
            else:
                self.rig.tap(self.adults[i % len(self.adults)])

    def append_debit_with_tac(self, tac: bytes) -> dict[str, Any]:
        """A debit/completed that the card never proved: a TAC of the gate's making,
        correctly chained and signed (a gate that lies, or a stolen device key)."""
        last = [e for e in self.rig.journal.entries()
                if (e.kind, e.state) == (KIND_DEBIT, COMPLETED)][-1]
        entry = self.rig.journal.append(Draft(
            kind=KIND_DEBIT, state=COMPLETED, terminal_id=last.terminal_id, amount=last.amount,
            card_serial=last.card_serial, card_type=last.card_type,
            balance_before=last.balance_after, balance_after=(last.balance_after or 0) - 250,
            card_counter=(last.card_counter or 0) + 1, card_random=last.card_random,
            terminal_seq=self.rig.journal.next_terminal_seq(), tx_date=last.tx_date,
            tx_time=last.tx_time, mac2=last.mac2, tac=tac, ref=last.ref))
        return entry.to_json()

    def entries(self) -> Entries:
        """Every entry as `tapgate journal export` prints it (Entry.to_json())."""
        return [e.to_json() for e in self.rig.journal.entries()]

    def close(self) -> None:
        self.rig.close()


def reseal(entry: dict[str, Any], key: Ed25519PrivateKey | None) -> dict[str, Any]:
    """The entry with its hash recomputed and signed again by ``key`` (as a forger with
    that key would)."""
    out = dict(entry)
    digest = chain_hash(out)
    out["hash"] = digest.hex().upper()
    out["sig"] = key.sign(digest).hex().upper() if key is not None else None
    return out


def batches(entries: Sequence[dict[str, Any]], size: int) -> list[tuple[str, Entries]]:
    """Entries cut into batches, each with a batch id that a resend keeps."""
    out = []
    for start in range(0, len(entries), size):
        chunk = list(entries[start:start + size])
        out.append((f"b{chunk[0].get('id')}-{chunk[-1].get('id')}-{start}", chunk))
    return out


@dataclass(frozen=True)
class Received:
    ack: contract.Ack
    topic: str
    correlation: bytes | None


class GateStub:
    """One gate's uplink: publishes batches, collects the head-end's acks."""

    def __init__(self, host: str, port: int, gate: str, *,
                 on_ack: Callable[[contract.Ack], None] | None = None,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        """``tls``: (CA, client certificate, its key) for a TLS listener."""
        self.gate = gate
        self.received: list[Received] = []
        self._on_ack = on_ack
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"gate-{gate}-{secrets.token_hex(4)}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        if tls is not None:
            ca, cert, key = tls
            self.client.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
        self.client.connect(host, port, 30, clean_start=True)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the gate stub could not subscribe to its ack topic"

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(contract.ack_topic(self.gate), options=SubscribeOptions(qos=1))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        ack = contract.Ack.decode(bytes(msg.payload))
        if self._on_ack is not None:
            self._on_ack(ack)  # before the ack counts, as a gate marks entries synced
        with self._cond:
            self.received.append(Received(ack, msg.topic,
                                          getattr(msg.properties, "CorrelationData", None)))
            self._cond.notify_all()

    def publish(self, batch_id: str, entries: Entries) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = contract.ack_topic(self.gate)
        props.CorrelationData = batch_id.encode()
        payload = contract.Batch(gate=self.gate, batch_id=batch_id, entries=entries).encode()
        self.publish_raw(payload, props)

    def publish_raw(self, payload: bytes, props: Properties | None = None) -> None:
        info = self.client.publish(contract.tx_topic(self.gate), payload, qos=1,
                                   properties=props)
        info.wait_for_publish(10)

    def acks(self, batch_id: str) -> list[Received]:
        with self._cond:
            return [r for r in self.received if r.ack.batch_id == batch_id]

    def wait_for_ack(self, batch_id: str, timeout: float) -> contract.Ack | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [r.ack for r in self.received if r.ack.batch_id == batch_id]
                if found:
                    return found[-1]
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def sync(self, todo: Sequence[tuple[str, Entries]], *, resend_after: float = 2.0,
             timeout: float = 60.0) -> dict[str, contract.Ack]:
        """Send every batch, and again each one not acknowledged after ``resend_after``,
        until all are acknowledged; return the latest ack of each."""
        deadline = time.monotonic() + timeout
        pending = dict(todo)
        since = {batch_id: len(self.acks(batch_id)) for batch_id in pending}
        done: dict[str, contract.Ack] = {}
        while pending:
            for batch_id, entries in pending.items():
                self.publish(batch_id, entries)
            resend_at = min(deadline, time.monotonic() + resend_after)
            with self._cond:
                while pending and time.monotonic() < resend_at:
                    for batch_id in list(pending):
                        fresh = self.acks_locked(batch_id)[since[batch_id]:]
                        if fresh:
                            done[batch_id] = fresh[-1].ack
                            del pending[batch_id]
                    if pending:
                        self._cond.wait(max(0.0, resend_at - time.monotonic()))
            if pending and time.monotonic() >= deadline:
                raise AssertionError(f"no ack for {sorted(pending)} in {timeout} s")
        return done

    def acks_locked(self, batch_id: str) -> list[Received]:
        return [r for r in self.received if r.ack.batch_id == batch_id]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

