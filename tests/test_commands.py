"""Operators' signed commands and the desired state, on the gate, against a real mosquitto.

The gate here is the sim rig (tests.rig.Rig: sim reader, software SAM, sim gate I/O,
a real journal) with the real Uplink and the real command handling (daemon.sync.commands)
in their own threads; the operator side is headend.command (its signing and its send),
or hand-built messages where a test forges, replays or breaks one. One test runs the
daemon itself. Taps go on between the commands and after every refusal.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.config import CARD_TYPES, validate
from daemon.journal import Journal
from daemon.outcome import Outcome
from headend import command
from headend.mqtt import Broker
from protocol import contract
from protocol.command import Incoming
from protocol.errors import ConfigError
from tests.cards import serial_of
from tests.command_support import (
    TIMEOUT_S,
    Console,
    Operator,
    TestGate,
    gate_in_process,
    new_gate_id,
)
from tests.configs import raw_config, toml_text
from tests.daemon_process import Daemon
from tests.fixtures.mosquitto import Mosquitto
from tests.waiting import wait_until


def send(broker: Mosquitto, op: Operator, target: str, name: str, args: dict[str, Any],
         seq: int | None = None) -> tuple[int, list[dict[str, Any]]]:
    """headend.command.send: sign, send, print the answer(s) as JSON lines."""
    out = io.StringIO()
    request = command.Request(target=target, name=name, args=args,
                              seq=next(op.seq) if seq is None else seq, ttl_s=60, timeout_s=10)
    rc = command.send(Broker(broker.host, broker.port), op.key, op.key_id, request, out)
    return rc, [json.loads(line) for line in out.getvalue().splitlines()]


# --- config --------------------------------------------------------------------------------
def test_operator_keys_config() -> None:
    op = Operator()
    raw = raw_config()
    raw["operators"] = {"keys": {op.key_id.lower(): op.public_hex}, "clock_skew_s": 5}
    operators = validate(raw).operators
    assert operators.keys == {op.key_id: bytes.fromhex(op.public_hex)}
    assert operators.clock_skew_s == 5
    assert validate(raw_config()).operators.keys == {}
    other = Operator()
    for table, why in (({"XYZ": op.public_hex}, "16 hex digits"),
                       ({op.key_id: "00"}, "64 hex digits"),
                       ({other.key_id: op.public_hex}, "the first 8 bytes of the public key"),
                       ({op.key_id: op.public_hex, other.key_id: op.public_hex},
                        "the first 8 bytes of the public key"),
                       ("nope", "must be a table")):
        raw["operators"] = {"keys": table}
        with pytest.raises(ConfigError, match=why):
            validate(raw)


# --- each command --------------------------------------------------------------------------
def test_each_command_works_and_answers(mosquitto: Mosquitto,
                                        make_gate: Callable[..., TestGate]) -> None:
    op = Operator()
    gate = make_gate([op])
    gid = gate.gate_id
    assert gate.tap(1).amount == 250

    rc, (reply,) = send(mosquitto, op, gid, "set_config",
                        {"gate.fares.adult": 300, "gate.anti_passback_s": 0})
    assert rc == command.EXIT_OK and reply["ok"] and reply["gate"] == gid
    assert reply["result"] == {"set": {"gate.fares.adult": 300, "gate.anti_passback_s": 0}}
    assert gate.tap(1).amount == 300  # from the next tap on

    rc, (reply,) = send(mosquitto, op, gid, "denylist", {
        "from_version": 0, "to_version": 1, "add": [serial_of(2).hex().upper()]})
    assert rc == command.EXIT_OK and reply["result"] == {"version": 1, "size": 1}
    refused = gate.tap(2)
    assert (refused.outcome, refused.reason) == (Outcome.REFUSED, "card on deny list")
    assert gate.tap(1).outcome is Outcome.ACCEPTED  # another card goes through
    rc, (reply,) = send(mosquitto, op, gid, "denylist", {
        "from_version": 1, "to_version": 2, "remove": [serial_of(2).hex()]})
    assert rc == command.EXIT_OK and reply["result"] == {"version": 2, "size": 0}
    assert gate.tap(2).outcome is Outcome.ACCEPTED

    rc, (reply,) = send(mosquitto, op, gid, "sync_now", {})
    assert rc == command.EXIT_OK and "pending_sync" in reply["result"]

    rc, (reply,) = send(mosquitto, op, gid, "report_status", {})
    assert rc == command.EXIT_OK and reply["result"]["taps"] > 0
    remote = reply["result"]["remote"]
    assert remote["deny_list"] == {"version": 2, "size": 0}
    assert remote["config"]["fares"][str(CARD_TYPES["adult"])] == 300

    passages = gate.rig.gate.passages
    rc, (reply,) = send(mosquitto, op, gid, "open_gate", {})
    assert rc == command.EXIT_OK and reply["result"] == {"opened": True}
    assert gate.rig.gate.passages == passages + 1

    rc, (reply,) = send(mosquitto, op, gid, "trigger_beacon", {})
    assert rc == command.EXIT_REFUSED
    assert (reply["ok"], reply["reason"]) == (False, "no beacon configured")

    rc, answers = send(mosquitto, op, contract.FLEET, "sync_now", {})
    assert rc == command.EXIT_OK and [a["gate"] for a in answers] == [gid]
    assert gate.commands.stats.applied == 7


# --- refusals ------------------------------------------------------------------------------
def test_forged_broken_and_stale_commands_are_refused_with_the_reason(
        mosquitto: Mosquitto, console: Console, make_gate: Callable[..., TestGate]) -> None:
    op, stranger = Operator(), Operator()
    gate = make_gate([op])
    gid = gate.gate_id
    now = int(time.time() * 1000)
    good = op.payload(gid, "sync_now", {}, seq=100)
    forged = json.loads(good)
    forged["body"]["args"] = {"x": 1}  # altered in transit: the signature no longer fits
    cases: list[tuple[str, bytes, str]] = [
        ("forged signature", json.dumps(forged).encode(), "bad signature"),
        ("signed by another key under our id",
         stranger.payload(gid, "sync_now", {}, key_id=op.key_id), "bad signature"),
        ("unknown key", stranger.payload(gid, "sync_now", {}), "unknown key id"),
        ("expired", op.payload(gid, "sync_now", {}, issued_at=now - 120_000), "expired"),
        ("future", op.payload(gid, "sync_now", {}, issued_at=now + 600_000),
         "issued in the future"),
        ("malformed", b"{not json", "malformed: not JSON"),
        ("wrong shape", b'{"key_id": "x", "body": 1, "sig": ""}', "malformed: "),
        ("oversized", b"x" * (contract.MAX_COMMAND_BYTES + 1), "too large"),
        ("seq past 64 bits", op.payload(gid, "sync_now", {}, seq=2**63),
         "malformed: body.seq must be an integer, 0 to 2**63 - 1"),
        ("another gate", op.payload("000000FFFFFF", "sync_now", {}), "not for this gate"),
        ("fleet on the gate's topic", op.payload(contract.FLEET, "sync_now", {}),
         "not for this gate"),
        ("unknown name", op.payload(gid, "self_destruct", {}), "unknown command"),
        ("bad fare", op.payload(gid, "set_config", {"gate.fares.adult": -1}), "bad args: "),
        ("not settable", op.payload(gid, "set_config", {"sam.purchase_key": "00"}),
         "bad args: "),
        ("bad window", op.payload(gid, "set_config", {"gate.anti_passback_s": "5"}),
         "bad args: "),
        ("bad deny-list", op.payload(gid, "denylist", {"from_version": 0, "to_version": 1,
                                                      "add": ["12"]}), "bad args: "),
    ]
    for n, (what, payload, reason) in enumerate(cases):
        reply = console.ask(gid, payload)
        assert reply["ok"] is False and reply["reason"].startswith(reason), (what, reply)
        assert reply["gate"] == gid
        assert gate.tap(10 + n).outcome is Outcome.ACCEPTED, what  # taps go on
    # a command refused for its arguments used its seq up: sent again (a tool's retry),
    # it is told the answer it got, and nothing is applied again
    refused_once = console.ask(gid, cases[-1][1])
    assert refused_once["reason"].startswith("bad args: ")
    first = console.ask(gid, good)
    assert first["ok"] and first["seq"] == 100
    assert console.ask(gid, good) == first  # a retry: the same answer, not "replayed"
    # another command under a used seq is a replay
    other = console.ask(gid, op.payload(gid, "report_status", {}, seq=100))
    assert (other["reason"], other["result"]) == ("replayed", {"last_seq": 100})
    lower = console.ask(gid, op.payload(gid, "sync_now", {}, seq=99))
    assert (lower["reason"], lower["result"]) == ("replayed", {"last_seq": 100})
    assert console.ask(gid, op.payload(gid, "sync_now", {}, seq=1000))["ok"]
    # a name this gate does not know uses no seq up
    assert console.ask(gid, op.payload(gid, "self_destruct", {}, seq=1001))["reason"] == (
        "unknown command")
    assert console.ask(gid, op.payload(gid, "sync_now", {}, seq=1001))["ok"]
    # a fleet command on the fleet topic, answered under the gate's own reply topic (which
    # only it may write), with the last level of the fleet's
    nonce = console.send(contract.fleet_cmd_topic(),
                         op.payload(contract.FLEET, "report_status", {}, seq=1002),
                         reply_under=contract.FLEET)
    wait_until(lambda: bool(console.replies.get(nonce)), "the fleet answer", TIMEOUT_S)
    assert console.replies[nonce][0]["ok"] and console.replies[nonce][0]["gate"] == gid
    assert console.topics[nonce] == [f"{contract.reply_topic(gid)}/{nonce.hex()}"]
    # an answer is never sent outside the reply topics: the refusal is only logged
    nonce = console.send(contract.cmd_topic(gid), op.payload(gid, "sync_now", {}, seq=5),
                         reply_under=None)
    time.sleep(0.3)
    assert nonce not in console.replies
    assert gate.commands.stats.refused >= len(cases) + 3
    assert gate.commands.verifier.answer_topic(contract.status_topic(gid)) is None
    assert gate.commands.verifier.answer_topic(contract.reply_topic("000000FFFFFF") + "/x") is None
    assert gate.commands.verifier.answer_topic(contract.reply_topic(contract.FLEET) + "/x") == (
        contract.reply_topic(gid) + "/x")


def test_deny_list_versions_and_state_survive_a_restart(
        mosquitto: Mosquitto, console: Console, make_gate: Callable[..., TestGate]) -> None:
    op = Operator()
    gate = make_gate([op])
    gid = gate.gate_id
    card3, card4 = serial_of(3).hex().upper(), serial_of(4).hex().upper()
    assert console.ask(gid, op.payload(gid, "denylist", {
        "from_version": 0, "to_version": 5, "add": [card3, card4]}))["ok"]
    stale = console.ask(gid, op.payload(gid, "denylist", {
        "from_version": 0, "to_version": 1, "remove": [card3]}))
    assert (stale["ok"], stale["reason"], stale["result"]) == (
        False, "deny list version mismatch", {"version": 5})
    assert gate.tap(3).reason == "card on deny list"  # the stale delta changed nothing
    assert console.ask(gid, op.payload(gid, "set_config", {"gate.fares.adult": 410}))["ok"]
    assert gate.tap(1).amount == 410

    gate.restart()
    assert gate.tap(3).reason == "card on deny list"
    assert gate.tap(4).reason == "card on deny list"
    assert gate.tap(1).amount == 410  # the remote fare came back from the journal
    assert gate.rig.processor.deny_list.version == 5
    replay = console.ask(gid, op.payload(gid, "sync_now", {}, seq=2))
    assert (replay["reason"], replay["result"]) == ("replayed", {"last_seq": 3})
    assert console.ask(gid, op.payload(gid, "denylist", {
        "from_version": 5, "to_version": 6, "remove": [card3]}))["ok"]
    assert gate.tap(3).outcome is Outcome.ACCEPTED

    # the journal alone holds it all: opened cold, by another process's code path
    with Journal(gate.rig.journal_path) as journal:
        assert journal.deny_list() == (6, frozenset({serial_of(4)}))
        assert journal.remote_config() == {"gate.fares.adult": 410}
        assert journal.last_command_seq(op.key_id) == 4


def test_key_rotation(mosquitto: Mosquitto, console: Console,
                      make_gate: Callable[..., TestGate]) -> None:
    old, new = Operator(), Operator()
    gate = make_gate([old, new])
    gid = gate.gate_id
    assert console.ask(gid, old.payload(gid, "sync_now", {}))["ok"]
    assert console.ask(gid, new.payload(gid, "sync_now", {}))["ok"]  # seqs are per key
    gate.restart([new])  # the old key removed from the config
    assert console.ask(gid, old.payload(gid, "sync_now", {}))["reason"] == "unknown key id"
    assert console.ask(gid, new.payload(gid, "sync_now", {}))["ok"]
    assert gate.tap(1).outcome is Outcome.ACCEPTED


def test_desired_state_applied_and_reported_retained(
        mosquitto: Mosquitto, console: Console, make_gate: Callable[..., TestGate]) -> None:
    op = Operator()
    gate = make_gate([op])
    gid = gate.gate_id
    desired = contract.desired_topic(gid)

    def wait_reported(expected: dict[str, Any]) -> None:
        wait_until(lambda: console.last_reported() == expected, f"reported {expected}",
                   TIMEOUT_S)

    try:
        console.send(desired, op.payload(gid, "desired", {
            "version": 3, "config": {"gate.fares.adult": 333}}, ttl_ms=3_600_000),
            retain=True)
        wait_reported({"version": 3})
        assert gate.tap(1).amount == 333
        # an older version is refused and said so; what runs stays
        console.send(desired, op.payload(gid, "desired", {
            "version": 2, "config": {"gate.fares.adult": 222}}), retain=True)
        wait_reported({"version": 3, "refused": {
            "version": 2, "reason": "version 2 is older than the version running (3)"}})
        console.send(desired, op.payload(gid, "desired", {
            "version": 4, "config": {"gate.fares.adult": "free"}}), retain=True)
        refused = wait_for_refusal(console, 4)
        assert refused.startswith("bad args: gate.fares.adult")
        forged = json.loads(op.payload(gid, "desired", {"version": 9, "config": {}}))
        forged["body"]["args"]["version"] = 10
        console.send(desired, json.dumps(forged).encode(), retain=True)
        assert wait_for_refusal(console, None) == "bad signature"
        assert gate.tap(1).amount == 333

        console.send(desired, op.payload(gid, "desired", {
            "version": 5, "config": {"gate.fares.adult": 555, "gate.anti_passback_s": 0}},
            ttl_ms=3_600_000), retain=True)
        wait_reported({"version": 5})
        assert gate.tap(1).amount == 555

        # a restart: the retained desired state comes again, the version is reported again
        console.reported.clear()
        gate.restart()
        wait_reported({"version": 5})
        assert gate.tap(1).amount == 555
        assert gate.commands.control.desired_version == 5
        # what a newcomer sees: the retained report
        late = Console(mosquitto)
        try:
            wait_until(lambda: any(r == ({"version": 5}, True) for r in late.reported),
                       "the retained report", TIMEOUT_S)
        finally:
            late.close()
    finally:
        console.send(desired, b"", retain=True)  # clear the retained message


def wait_for_refusal(console: Console, version: int | None) -> str:
    def refused() -> bool:
        last = console.last_reported()
        return bool(last and last.get("refused", {}).get("version", -1) == version)

    wait_until(refused, f"the refusal of desired version {version}", TIMEOUT_S)
    last = console.last_reported()
    assert last is not None
    return str(last["refused"]["reason"])


def test_commands_are_handled_without_a_broker_in_between(tmp_path: Path) -> None:
    """The handling itself, as paho hands it over: the queue, the thread, the answer."""
    op = Operator()
    rig, commands, published = gate_in_process(tmp_path, [op])
    gid = commands.gate_id
    stop = threading.Event()
    thread = threading.Thread(target=commands.run, args=(stop,))
    thread.start()
    try:
        reply_to = contract.reply_topic(gid) + "/abc"
        commands.submit(Incoming(contract.cmd_topic(gid), op.payload(gid, "sync_now", {}),
                                 reply_to, b"corr"))
        commands.submit(Incoming(contract.cmd_topic(gid), op.payload(gid, "open_gate", {}),
                                 reply_to, b"corr2"))
        wait_until(lambda: len(published) == 2, "two answers", TIMEOUT_S)
    finally:
        stop.set()
        thread.join(TIMEOUT_S)
        rig.close()
    answers = [(json.loads(p)["reason"], kw["correlation"]) for _, p, kw in published]
    assert answers == [("no uplink", b"corr"), ("no gate I/O", b"corr2")]


# --- the daemon ----------------------------------------------------------------------------
def test_the_daemon_obeys_signed_commands_and_keeps_taking_taps(
        tmp_path: Path, mosquitto: Mosquitto, console: Console) -> None:
    op = Operator()
    gid = new_gate_id()
    raw = raw_config(tmp_path / "journal.db")
    raw["gate"]["terminal_id"] = gid
    raw["gate"]["anti_passback_s"] = 0
    raw["reader"] = {"backend": "sim", "sim_interval_s": 0.05, "sim_cards": 3,
                     "sim_tear_rate": 0}
    raw["mqtt"] = {"host": mosquitto.host, "port": mosquitto.port, "reconnect_min_s": 0.05,
                   "reconnect_max_s": 0.5, "status_interval_s": 0.5}
    raw["operators"] = {"keys": {op.key_id: op.public_hex}}
    config = tmp_path / "tapgate.toml"
    config.write_text(toml_text(raw), encoding="utf-8")
    denied = "tap 8801000000000001: refused (card on deny list)"
    daemons: list[Daemon] = []
    try:
        daemon = Daemon(config)
        daemons.append(daemon)
        daemon.wait_log("tapgate running")
        daemon.wait_log("connected to the broker")
        time.sleep(0.3)
        assert console.ask(gid, b"\x00 junk")["reason"] == "malformed: not JSON"
        reply = console.ask(gid, op.payload(gid, "denylist", {
            "from_version": 0, "to_version": 1, "add": ["8801000000000001"]}))
        assert reply["ok"], reply
        daemon.wait_log(denied, 2)
        taps = daemon.count("tapgate.tap: tap ")
        daemon.wait_log("tapgate.tap: tap ", taps + 1)  # taps go on after the command
        status = console.ask(gid, op.payload(gid, "report_status", {}))
        assert status["result"]["remote"]["deny_list"] == {"version": 1, "size": 1}
        assert status["result"]["commands"]["refused"] == 1
        assert daemon.stop() == 0
        assert daemon.count("tapgate.tap: tap ") > taps

        daemon = Daemon(config)  # the deny list and the seq survive the restart
        daemons.append(daemon)
        daemon.wait_log("connected to the broker")
        daemon.wait_log(denied, 2)
        time.sleep(0.3)
        replay = console.ask(gid, op.payload(gid, "sync_now", {}, seq=1))
        assert (replay["reason"], replay["result"]) == ("replayed", {"last_seq": 2})
        assert daemon.stop() == 0
    finally:
        for d in daemons:
            d.kill()
