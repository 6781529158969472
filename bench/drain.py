"""Draining a backlog through the uplink, beside a bare paho publish loop of the same bytes.

A journal on disk (bench.common.scratch_dir()) gets a backlog of signed entries, as a
gate that was offline for a long time would have: debit intents and completions with
full card data and the TAC the card would have made (bench.common.MASTER_TAC), and some
refusals. A mosquitto on a free loopback port and an acking subscriber in a process of
its own (it decodes every batch and acks its uuids per protocol.contract, as a
head-end does after storing) stand in for the back office; with --headend the real
tapgate-headend does, with the gate's device key and the TAC master key: it stores and
acknowledges each batch, and checks every hash, signature and TAC after the ack. Then
how long its verdicts took is printed too (from the start of the drain to the last
verdict written), and how many entries it flagged (none should be).

  a) tapgate: daemon.sync.uplink.Uplink drains the backlog, QoS 1 batches with response
     topic and correlation data, a window of batches in flight, each entry marked synced
     in the journal when the subscriber's ack names it. Timed from the start of the
     uplink to the last entry acknowledged in the journal.
  b) bare: one paho client publishes the batches the uplink sends (same batch sizes,
     same bytes, encoded beforehand), QoS 1, to a topic the same subscriber consumes
     without acking; timed to the last PUBACK. No journal, no JSON, no application ack.
     Pipelined (as fast as paho takes them, its default 20 in flight: the target's
     baseline) and one at a time (each waits for its PUBACK). Each runs before and
     after (a); the faster run counts.

  c) the ceiling of a / b (bench/drain_ceiling.py): the same batches, window and broker,
     from a publisher that costs nothing into a paho consumer that acks each batch
     unread, and into one that only parses, inserts, commits and acks.

Targets: a >= 5,000 entries/s and a / b >= 0.5. Informational: PASS or MISS, exit 0.

    python -m bench.drain [--entries 100000] [--batch 100] [--window 4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench import drain_ceiling
from bench.common import MASTER_TAC, TERMINAL, scratch_dir
from daemon.config import MqttConfig
from daemon.journal import Journal
from daemon.sync.uplink import Uplink
from headend import keys
from protocol import contract
from protocol.entry import COMPLETED, INTENT, KIND_DEBIT, KIND_REFUSAL, REFUSED, Draft
from protocol.tgp1.crypto import Purchase, card_tac_key

GATE = TERMINAL.hex().upper()
BARE_TOPIC = "bench/bare"
DEADLINE_S = 600.0


# --- the backlog ---------------------------------------------------------------------------
def drafts(n: int) -> Iterator[Draft]:
    """A gate's day: intents and their completions, a refusal now and then."""
    tac_keys: dict[bytes, bytes] = {}
    i = 0
    while i < n:
        serial = bytes.fromhex("88010000") + (i % 50_000).to_bytes(4, "big")
        if i % 10 == 9:
            yield Draft(kind=KIND_REFUSAL, state=REFUSED, terminal_id=TERMINAL,
                        reason="anti-passback", card_serial=serial)
            i += 1
            continue
        seq = i + 1
        common: dict[str, Any] = {
            "terminal_id": TERMINAL, "amount": 250, "card_serial": serial, "card_type": 1,
            "balance_before": 10_000, "card_counter": seq & 0xFFFF,
            "card_random": os.urandom(4), "terminal_seq": seq, "tx_date": "20260504",
            "tx_time": "080000"}
        if serial not in tac_keys:
            tac_keys[serial] = card_tac_key(MASTER_TAC, serial)
        tac = Purchase(card_random=common["card_random"], counter=common["card_counter"],
                       terminal_seq=seq, amount=250, terminal_id=TERMINAL,
                       date=bytes.fromhex(common["tx_date"]),
                       time=bytes.fromhex(common["tx_time"])).tac(tac_keys[serial])
        yield Draft(kind=KIND_DEBIT, state=INTENT, **common)
        yield Draft(kind=KIND_DEBIT, state=COMPLETED, balance_after=9_750, mac2=os.urandom(4),
                    tac=tac, ref=i + 1, **common)
        i += 2


def build_backlog(path: Path, n: int, signer: Ed25519PrivateKey) -> Journal:
    journal = Journal(path, signer=signer).open()
    pending: list[Draft] = []
    for draft in drafts(n):
        pending.append(draft)
        if len(pending) == 10_000:
            journal.append_many(pending)
            pending = []
    journal.append_many(pending)
    return journal


# --- the broker ----------------------------------------------------------------------------
class Broker:
    """mosquitto on a free loopback port with a config of its own (not the test fixture:
    that one reports through pytest)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.access(binary, os.X_OK):
            sys.exit("bench.drain: mosquitto is not installed (Debian: apt-get install mosquitto)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        config = workdir / "mosquitto.conf"
        # set_tcp_nodelay: mosquitto's default lets Nagle hold an ack behind the PUBACK
        # before it until the client's delayed ACK (~40 ms); a broker for gates sets it
        config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                          "persistence false\nmax_queued_messages 100000\n"
                          "set_tcp_nodelay true\n", encoding="utf-8")
        self._log = (workdir / "mosquitto.log").open("wb")
        self.proc = subprocess.Popen([binary, "-c", str(config)], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"bench.drain: mosquitto did not start (see {workdir})")
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


# --- the acking subscriber (a process of its own) ------------------------------------------
def subscriber(port: int, ready: multiprocessing.connection.Connection, acking: bool) -> None:
    """Acks every batch on .../tx after decoding it (if ``acking``: not when the real
    head-end does it); counts what comes on BARE_TOPIC."""
    counts = {"bare": 0, "batches": 0}

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == BARE_TOPIC:
            counts["bare"] += 1
            return
        batch = contract.Batch.decode(bytes(msg.payload))
        uuids = [str(e["uuid"]) for e in batch.entries]
        counts["batches"] += 1
        assert msg.properties is not None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = msg.properties.CorrelationData
        client.publish(msg.properties.ResponseTopic, contract.Ack(batch.batch_id, uuids).encode(),
                       qos=1, properties=props)

    def on_connect(client: mqtt.Client, *args: object) -> None:
        client.subscribe([(contract.tx_topic("+"), 1), (BARE_TOPIC, 1)] if acking
                         else [(BARE_TOPIC, 1)])

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-headend",
                         protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_connect = on_connect
    client.on_subscribe = lambda *args: ready.send("ready")
    client.connect("127.0.0.1", port)
    sock = client.socket()
    if isinstance(sock, socket.socket):  # as the uplink does: acks go out at once
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_forever()


# --- a) the uplink, b) the bare loop -------------------------------------------------------
def wire_payloads(journal: Journal, batch: int) -> list[bytes]:
    """The batches the uplink will send, encoded the same way, for the bare loop."""
    payloads: list[bytes] = []
    after = 0
    while entries := journal.unacked_wire(after, batch):
        payloads.append(contract.Batch.wrap(GATE, f"bare-{len(payloads)}", entries.json))
        after = entries.ids[-1]
    return payloads


def drain(journal: Journal, port: int, batch: int, window: int) -> tuple[float, float]:
    """(when the uplink started, seconds until the last entry was acknowledged)"""
    config = MqttConfig(host="127.0.0.1", port=port, batch_size=batch, window=window,
                        ack_timeout_s=60, status_interval_s=3600)
    uplink = Uplink(config=config, gate_id=GATE, journal=journal)
    total = journal.pending_sync_count()
    stop = threading.Event()
    thread = threading.Thread(target=uplink.run, args=(stop,), name="uplink")
    started = time.perf_counter()
    thread.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while uplink.stats.entries_acked < total:
            if time.monotonic() > deadline:
                sys.exit(f"bench.drain: drain stuck at {uplink.stats.entries_acked}/{total}")
            time.sleep(0.002)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        uplink.notify()
        thread.join()
    assert journal.pending_sync_count() == 0
    print(f"  uplink: {uplink.stats.batches_sent} batches, {uplink.stats.entries_sent} entries "
          f"sent, {uplink.stats.entries_acked} acknowledged, {uplink.stats.resends} resends")
    return started, elapsed


def wait_verdicts(db: Path, n: int, started: float) -> tuple[float, int]:
    """Until the head-end has written the verdicts of all ``n`` entries: seconds since
    the drain started, and how many entries it flagged."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            (pending,) = con.execute("SELECT COUNT(*) FROM entry "
                                     "WHERE hash_state = 'pending'").fetchone()
            if not pending:
                done = time.perf_counter() - started
                stored, flagged = con.execute("SELECT COUNT(*), COUNT(problems) FROM entry"
                                              ).fetchone()
                if stored != n:
                    sys.exit(f"bench.drain: the head-end stored {stored} of {n} entries")
                return done, int(flagged)
        finally:
            con.close()
        if time.monotonic() > deadline:
            sys.exit(f"bench.drain: {pending} verdicts still pending")
        time.sleep(0.1)


def bare(port: int, payloads: list[bytes], *, one_at_a_time: bool = False) -> float:
    """Publish ``payloads`` QoS 1, time to the last PUBACK: as fast as paho takes them
    (its default 20 in flight), or each waiting for its PUBACK before the next."""
    done = threading.Event()
    acked = [0]

    def on_publish(*args: object) -> None:
        acked[0] += 1
        if acked[0] == len(payloads):
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare",
                         protocol=mqtt.MQTTv5)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.perf_counter()
    for payload in payloads:
        info = client.publish(BARE_TOPIC, payload, qos=1)
        if one_at_a_time:
            info.wait_for_publish(DEADLINE_S)
    if not done.wait(DEADLINE_S):
        sys.exit("bench.drain: the bare loop's PUBACKs did not all come")
    elapsed = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    return elapsed


def start_headend(work: Path, port: int, signer: Ed25519PrivateKey) -> subprocess.Popen[bytes]:
    """tapgate-headend run on a fresh SQLite store with the gate's device key and the TAC
    master key, subscribed before the drain starts."""
    log = (work / "headend.log").open("wb")
    gate_keys, tac_key = work / "gates.toml", work / "tac.key"
    gate_keys.write_text(f'{GATE} = "{keys.public_raw(signer).hex().upper()}"\n',
                         encoding="ascii")
    tac_key.write_text(MASTER_TAC.hex().upper() + "\n", encoding="ascii")
    tac_key.chmod(0o600)
    proc = subprocess.Popen([sys.executable, "-m", "headend.cli", "--log-level", "WARNING",
                             "run", "--broker", f"127.0.0.1:{port}",
                             "--db", f"sqlite:///{work / 'headend.db'}",
                             "--gate-keys", str(gate_keys), "--tac-key-file", str(tac_key)],
                            stdout=log, stderr=subprocess.STDOUT)
    time.sleep(2.0)  # its subscription must be in place before the gate sends
    if proc.poll() is not None:
        sys.exit(f"bench.drain: tapgate-headend exited (see {work / 'headend.log'})")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--headend", action="store_true",
                        help="drain into the real head-end (tapgate-headend run, SQLite) "
                             "instead of the acking stand-in")
    args = parser.parse_args()

    work = scratch_dir()
    t0 = time.perf_counter()
    signer = Ed25519PrivateKey.generate()
    journal = build_backlog(work / "journal.db", args.entries, signer)
    n = journal.pending_sync_count()
    print(f"backlog: {n} signed entries in {time.perf_counter() - t0:.1f} s "
          f"({journal.size_bytes() / 1e6:.1f} MB journal)")

    broker = Broker(work)
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    sub = ctx.Process(target=subscriber, args=(broker.port, theirs, not args.headend),
                      daemon=True)
    sub.start()
    pipes, consumers = [ours], []
    for mode in drain_ceiling.MODES:
        mine, its = ctx.Pipe()
        pipes.append(mine)
        consumers.append(ctx.Process(target=drain_ceiling.consumer, daemon=True, args=(
            broker.port, mode, drain_ceiling.database(work, mode), its)))
        consumers[-1].start()
    headend = start_headend(work, broker.port, signer) if args.headend else None
    verdicts: tuple[float, int] | None = None
    try:
        for pipe in pipes:
            if not pipe.poll(20):
                sys.exit("bench.drain: a subscriber did not come up")
            pipe.recv()
        payloads = wire_payloads(journal, args.batch)
        bare_times = [bare(broker.port, payloads)]
        serial_times = [bare(broker.port, payloads, one_at_a_time=True)]
        started, elapsed = drain(journal, broker.port, args.batch, args.window)
        if headend is not None:  # and before the bare loop runs again beside its checks
            verdicts = wait_verdicts(work / "headend.db", n, started)
        bare_times.append(bare(broker.port, payloads))
        serial_times.append(bare(broker.port, payloads, one_at_a_time=True))
        ceiling = {mode: drain_ceiling.replay(broker.port, mode, payloads, args.window,
                                              DEADLINE_S) for mode in drain_ceiling.MODES}
    finally:
        for process in consumers:
            process.terminate()
        if headend is not None:
            headend.terminate()
            headend.wait(30)
        sub.terminate()
        broker.stop()
        journal.close()

    rate = n / elapsed
    bare_rate = n / min(bare_times)
    serial_rate = n / min(serial_times)
    size = sum(len(p) for p in payloads)
    print(f"entries: {n} in {len(payloads)} batches of up to {args.batch} "
          f"({size / 1e6:.1f} MB on the wire), window {args.window}")
    into = "the real head-end (SQLite)" if args.headend else "an acking stand-in"
    print(f"a) drains into {into}")
    print(f"a) tapgate uplink drain, acked:    {rate:10.0f} entries/s  ({elapsed:.2f} s)"
          f"  target >= 5000: {'PASS' if rate >= 5000 else 'MISS'}")
    if verdicts is not None:
        print(f"   head-end verdicts all written:  {n / verdicts[0]:10.0f} entries/s  "
              f"({verdicts[0]:.2f} s from the drain's start; {verdicts[1]} flagged)")
    print(f"b) bare paho QoS 1, pipelined:     {bare_rate:10.0f} entries/s  "
          f"({', '.join(f'{t:.2f} s' for t in bare_times)})")
    print(f"   bare paho QoS 1, one at a time: {serial_rate:10.0f} entries/s  "
          f"({', '.join(f'{t:.2f} s' for t in serial_times)})")
    print(f"a / b (pipelined):                 {rate / bare_rate:10.2f}"
          f"  target >= 0.5: {'PASS' if rate / bare_rate >= 0.5 else 'MISS'}")
    print(f"a / b (one at a time):             {rate / serial_rate:10.2f}")
    print("c) ceiling of a / b: the same batches from a free gate into a consumer that")
    for mode, what in ((drain_ceiling.ACK_ONLY, "acks unread"),
                       (drain_ceiling.STORING, "stores, acks")):
        rate_c = n / ceiling[mode]
        print(f"   {what + ':':31s} {rate_c:10.0f} entries/s  ({ceiling[mode]:.2f} s)"
              f"  c / b {rate_c / bare_rate:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
