"""The ceiling of bench.drain's a / b: a gate that costs nothing, into consumers that do
less than any head-end can.

a / b compares a drain that ends with every entry acknowledged by the far end against a
loop that ends at the broker's PUBACK: b never waits for a consumer. How close a / b can
get is bounded by what the round trip through a consumer costs, whatever the gate does.
This measures that bound on the same broker, same payloads, same run. A replaying
publisher (no journal, no JSON: the batches a) sent, encoded beforehand, each with its
response topic and correlation data, ``window`` in flight, the next one sent when an ack
comes) drains into a consumer in a process of its own (paho, as the head-end) that

  c1) acks each batch at once without reading it (an empty ack): the round trip alone;
  c2) does the least a head-end that stores must: parse the batch (json.loads), insert
      its entries (uuid, gate, id, hashes, the entry's JSON) with INSERT ... ON CONFLICT
      (uuid) DO NOTHING into SQLite (WAL, synchronous=FULL), commit, ack the uuids. No
      chain check, no verdicts, no peewee, no logging.

c / b above 0.5 would say a faster gate and head-end could meet the target; below it, no
acknowledged drain through a paho consumer on this machine can.
"""

from __future__ import annotations

import json
import multiprocessing.connection
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol import contract

_INSERT = ("INSERT INTO entry (gate, uuid, entry_id, prev_hash, hash, entry_json) "
           "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (uuid) DO NOTHING")


ACK_ONLY, STORING = "ack-only", "storing"
MODES = (ACK_ONLY, STORING)
GATE = "CE11A000"  # the gate id the storing consumer records


def _topics(mode: str) -> tuple[str, str]:
    """(tx, ack) of one mode: outside tapgate/v1/, so that neither the a) stand-in nor
    a real head-end (tapgate/v1/+/tx) takes these batches, nor one mode the other's."""
    return f"bench/ceiling/{mode}/tx", f"bench/ceiling/{mode}/ack"


def consumer(port: int, mode: str, db_path: str,
             ready: multiprocessing.connection.Connection) -> None:
    """Ack every batch on the mode's tx topic, unread (ACK_ONLY) or once stored
    (STORING): a process of its own."""
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS entry (id INTEGER PRIMARY KEY, gate TEXT, "
               "uuid TEXT UNIQUE, entry_id INTEGER, prev_hash TEXT, hash TEXT, "
               "entry_json TEXT)")
    dumps = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        assert msg.properties is not None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = msg.properties.CorrelationData
        if mode == ACK_ONLY:
            client.publish(msg.properties.ResponseTopic, b"{}", qos=1, properties=props)
            return
        batch = json.loads(msg.payload)
        entries = batch["entries"]
        gate = GATE
        db.execute("BEGIN IMMEDIATE")
        db.executemany(_INSERT, [(gate, e["uuid"], e["id"], e["prev_hash"], e["hash"],
                                  dumps(e)) for e in entries])
        db.execute("COMMIT")
        ack = contract.Ack(str(batch["batch"]), [str(e["uuid"]) for e in entries])
        client.publish(msg.properties.ResponseTopic, ack.encode(), qos=1, properties=props)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-ceiling-{mode}",
                         protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(_topics(mode)[0], 1)
    client.on_subscribe = lambda *args: ready.send("ready")
    client.connect("127.0.0.1", port)
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_forever()


def replay(port: int, mode: str, payloads: list[bytes], window: int,
           deadline_s: float) -> float:
    """Send ``payloads`` as a gate's batches, ``window`` awaiting their ack at a time;
    seconds from the first publish to the last ack."""
    lock = threading.Lock()
    done = threading.Event()
    state = {"next": 0, "acked": 0}
    tx_topic, ack_topic = _topics(mode)

    def send(client: mqtt.Client) -> None:  # with the lock held
        i = state["next"]
        if i < len(payloads):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = ack_topic
            props.CorrelationData = i.to_bytes(4, "big")
            state["next"] = i + 1
            client.publish(tx_topic, payloads[i], qos=1, properties=props)

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with lock:
            state["acked"] += 1
            if state["acked"] == len(payloads):
                done.set()
            send(client)

    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-ceiling-gate-{mode}",
                         protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(ack_topic, 1)
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect("127.0.0.1", port)
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    if not subscribed.wait(20):
        sys.exit("bench.drain: the ceiling's publisher could not subscribe")
    started = time.perf_counter()
    with lock:
        for _ in range(window):
            send(client)
    if not done.wait(deadline_s):
        sys.exit("bench.drain: the ceiling's acks did not all come")
    elapsed = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    return elapsed


def database(work: Path, mode: str) -> str:
    return str(work / f"ceiling-{mode}.db")
