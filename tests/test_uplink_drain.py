"""The uplink draining a journal, in process, against a real mosquitto and the
stand-in head-end of tests/uplink_support.py: every entry once and in order, synced only
when an ack names it in a batch the gate sent; the window bounds what is in flight;
overdue acks resend ever less often; a partial ack leaves the rest pending; a prune
after a drain keeps the chain verifiable.
"""

from __future__ import annotations

import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from daemon.journal import Journal
from daemon.metrics import journal_gauges
from daemon.sync.retention import prune_once
from daemon.sync.uplink import Uplink
from protocol import contract
from tests.fixtures.mosquitto import Mosquitto
from tests.uplink_support import (
    HeadEnd,
    _properties,
    booted_just_now,
    journal_uuids,
    mqtt_config,
    refusals,
    retained_status,
    running,
)
from tests.waiting import TIMEOUT_S, wait_until


# --- draining ------------------------------------------------------------------------------
def test_normal_drain_sends_every_entry_once_in_order_and_all_get_acked(
        mosquitto: Mosquitto, headend: HeadEnd, gate: tuple[str, Journal]) -> None:
    gate_id, journal = gate
    terminal = bytes.fromhex(gate_id)
    journal.append_many(refusals(terminal, 237))
    uplink = Uplink(config=mqtt_config(mosquitto), gate_id=gate_id, journal=journal,
                    telemetry=lambda: {"pending_sync": journal.pending_sync_count()})
    with running(uplink):
        wait_until(lambda: journal.pending_sync_count() == 0, "the backlog to drain")
        for _ in range(5):  # and what the card loop writes meanwhile
            journal.append(refusals(terminal, 1, "live")[0])
            uplink.notify()
        wait_until(lambda: journal.pending_sync_count() == 0, "the new entries to drain")
        status, retained = retained_status(mosquitto, gate_id)

    assert headend.uuids_of(gate_id) == journal_uuids(journal)
    assert sorted(headend.arrivals) == sorted(journal_uuids(journal))  # each exactly once
    assert headend.chain_problems(gate_id) == []
    assert journal_gauges(journal, time.time()).pending_sync == 0
    assert uplink.stats.entries_acked == 242 and uplink.stats.resends == 0
    for batch, response_topic, correlation in headend.batches:
        assert batch.gate == gate_id and 0 < len(batch.entries) <= 20
        assert response_topic == contract.ack_topic(gate_id)
        assert correlation == batch.batch_id.encode()
    ids = [e["id"] for batch, _, _ in headend.batches for e in batch.entries]
    assert ids == sorted(ids)
    assert retained and status.state == contract.ONLINE and status.gate == gate_id
    assert "pending_sync" in status.telemetry and "uplink" in status.telemetry


def test_the_window_bounds_what_is_in_flight(mosquitto: Mosquitto, headend: HeadEnd,
                                             gate: tuple[str, Journal]) -> None:
    """With the head-end silent, no more than the window goes out: the backlog waits in
    the journal, not in paho's queue."""
    gate_id, journal = gate
    journal.append_many(refusals(bytes.fromhex(gate_id), 500))
    headend.hold()
    uplink = Uplink(config=mqtt_config(mosquitto, batch_size=10, window=3, ack_timeout_s=600),
                    gate_id=gate_id, journal=journal)
    with running(uplink):
        wait_until(lambda: headend.received_batches() >= 3, "the first window")
        time.sleep(1.0)  # room to overshoot, were the window not kept
        assert headend.received_batches() == 3
        assert uplink.stats.entries_sent == 30 and journal.pending_sync_count() == 500
        headend.release()
        wait_until(lambda: journal.pending_sync_count() == 0, "the drain after release")
    assert headend.uuids_of(gate_id) == journal_uuids(journal)


def test_an_entry_is_synced_only_by_an_ack_naming_it_in_a_batch_the_gate_sent(
        mosquitto: Mosquitto, headend: HeadEnd, gate: tuple[str, Journal]) -> None:
    gate_id, journal = gate
    entries = journal.append_many(refusals(bytes.fromhex(gate_id), 30))
    headend.hold()
    # on a machine up for less than the ack timeout, the batch the forged ack left out
    # must still be sent again (a monotonic reading was once compared with 0)
    uplink = Uplink(config=mqtt_config(mosquitto, batch_size=10, window=1, ack_timeout_s=600),
                    gate_id=gate_id, journal=journal, monotonic=booted_just_now())
    forger = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    forger.connect(mosquitto.host, mosquitto.port)
    forger.loop_start()
    ack_topic = contract.ack_topic(gate_id)
    try:
        with running(uplink):
            wait_until(lambda: headend.received_batches() == 1, "the first batch")
            first, _, _ = headend.batches[0]
            others = [e.uuid for e in entries[10:]]
            for payload in (b"\xff not json", b"[]", b'{"stored": 5}',
                            contract.Ack("no-such-batch", others).encode(),
                            contract.Ack(first.batch_id, others).encode()):  # not in it
                forger.publish(ack_topic, payload, qos=1).wait_for_publish(TIMEOUT_S)
            time.sleep(0.5)
            assert journal.pending_sync_count() == 30
            # a PUBACK from the broker is no ack either: the batch is at the broker
            assert uplink.stats.entries_acked == 0
            headend.release()
            wait_until(lambda: journal.pending_sync_count() == 0, "the drain")
    finally:
        forger.disconnect()
        forger.loop_stop()
    assert headend.uuids_of(gate_id) == journal_uuids(journal)


def test_overdue_acks_resend_from_the_journal_ever_less_often(
        mosquitto: Mosquitto, headend: HeadEnd, gate: tuple[str, Journal]) -> None:
    """A head-end that is away gets the window again, but not every ack timeout: the
    wait doubles (0.2, 0.4, 0.8 ... s here), so its queue at the broker stays small."""
    gate_id, journal = gate
    journal.append_many(refusals(bytes.fromhex(gate_id), 40))
    headend.hold()
    uplink = Uplink(config=mqtt_config(mosquitto, batch_size=10, window=1, ack_timeout_s=0.2),
                    gate_id=gate_id, journal=journal)
    with running(uplink):
        time.sleep(2.5)  # every 0.2 s would be a dozen copies
        copies = headend.received_batches()
        assert 2 <= copies <= 5, copies
        assert {tuple(e["uuid"] for e in b.entries) for b, _, _ in headend.batches} == {
            tuple(e.uuid for e in journal.unacked(0, 10))}  # always the first, again
        headend.release()
        wait_until(lambda: journal.pending_sync_count() == 0, "the drain")
    assert headend.uuids_of(gate_id) == journal_uuids(journal)


def test_a_partial_ack_leaves_the_rest_pending_and_it_is_sent_again(
        mosquitto: Mosquitto, gate: tuple[str, Journal]) -> None:
    gate_id, journal = gate
    entries = journal.append_many(refusals(bytes.fromhex(gate_id), 10))
    refused = entries[4].uuid
    seen: list[list[str]] = []

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        batch = contract.Batch.decode(bytes(msg.payload))
        uuids = [e["uuid"] for e in batch.entries]
        seen.append(uuids)
        stored = [u for u in uuids if u != refused or len(seen) > 1]  # stores it next time
        assert msg.properties is not None
        props = _properties()
        props.CorrelationData = msg.properties.CorrelationData
        client.publish(msg.properties.ResponseTopic,
                       contract.Ack(batch.batch_id, stored, {refused: "TAC"}).encode(),
                       qos=1, properties=props)

    picky = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    picky.on_message = on_message
    picky.connect(mosquitto.host, mosquitto.port)
    picky.subscribe(contract.tx_topic(gate_id), qos=1)
    picky.loop_start()
    try:
        uplink = Uplink(config=mqtt_config(mosquitto, ack_timeout_s=0.3), gate_id=gate_id,
                        journal=journal)
        with running(uplink):
            wait_until(lambda: journal.pending_sync_count() == 0, "the refused entry to sync")
    finally:
        picky.disconnect()
        picky.loop_stop()
    assert seen[0] == journal_uuids(journal)
    assert seen[1] == [refused]


def test_prune_after_a_drain_keeps_the_chain_verifiable_and_sync_going_on(
        mosquitto: Mosquitto, headend: HeadEnd, gate: tuple[str, Journal]) -> None:
    gate_id, journal = gate
    terminal = bytes.fromhex(gate_id)
    journal.append_many(refusals(terminal, 50))
    uplink = Uplink(config=mqtt_config(mosquitto), gate_id=gate_id, journal=journal)
    with running(uplink):
        wait_until(lambda: journal.pending_sync_count() == 0, "the drain")
        journal.append(refusals(terminal, 1, "unsent")[0])  # not acked: stops the prune
        pruned = prune_once(journal, retention_days=30, now=time.time() + 60 * 86400)
        assert pruned == 50
        assert journal.verify().ok and journal.count() == 1
        for draft in refusals(terminal, 25, "after"):
            journal.append(draft)
        uplink.notify()
        wait_until(lambda: journal.pending_sync_count() == 0, "the drain after the prune")
        assert prune_once(journal, retention_days=30, now=time.time() + 60 * 86400) == 25
    assert journal.verify().ok and journal.count() == 1
    assert len(headend.uuids_of(gate_id)) == 76
    assert headend.chain_problems(gate_id) == []  # the head-end's chain spans the prunes
