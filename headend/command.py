"""`tapgate-headend command`: sign an operator command, send it, print the answer.

The command is signed end to end with the operator's Ed25519 key over the canonical JSON
of its body (target, seq, issued_at, expires_at, name, args): the broker carries it but
can neither forge nor alter it. The answer comes on a reply topic used once, under the
target's reply topic (``tapgate/v1/<target>/reply/<nonce>``), matched by its
Correlation Data.

Sequence numbers never repeat from one operator machine: the last one used is kept in
``$XDG_STATE_HOME/tapgate-headend/seq`` (default ``~/.local/state``), under a lock, and
``--seq`` moves it forward.

A command to one gate that gets no answer in time is sent again, the same signed bytes
with the same seq and reply topic (``--retries``): a gate that applied it answers with
the answer it gave then, and applies nothing twice. A new seq would be a new command.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from headend.mqtt import Broker, new_client
from protocol import contract
from protocol.errors import ConfigError, SyncError
from protocol.mqtt import connect_properties, publish_properties

log = logging.getLogger("tapgate.headend.command")

EXIT_OK = 0
EXIT_NO_ANSWER = 1
EXIT_REFUSED = 3


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tapgate-headend"


def next_seq(directory: Path, explicit: int | None = None) -> int:
    """The next sequence number (the last one + 1, or ``explicit``), remembered durably
    before it is used: a command sent is never followed by one with the same number."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / "seq"
    with (directory / "seq.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            last = int(path.read_text(encoding="ascii").strip() or 0)
        except FileNotFoundError:
            last = 0
        except ValueError as err:
            raise ConfigError("seq", str(path), "is not a number; fix or remove it") from err
        seq = explicit if explicit is not None else last + 1
        tmp = directory / "seq.tmp"
        with tmp.open("w", encoding="ascii") as fh:
            fh.write(f"{max(last, seq)}\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    return seq


def parse_args(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; a value is JSON when it parses as JSON (300, true, [1,2],
    {"a":1}), a string otherwise."""
    args: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError("command argument", item, "expected key=value")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        args[key] = value
    return args


def sign(key: Ed25519PrivateKey, key_id: str, body: contract.CommandBody) -> contract.SignedCommand:
    return contract.SignedCommand(key_id=key_id, body=body,
                                  sig=key.sign(contract.canonical(body.to_json())))


@dataclass(frozen=True, slots=True)
class Request:
    target: str  # a gate id or contract.FLEET
    name: str
    args: dict[str, Any]
    seq: int
    ttl_s: int
    timeout_s: float  # per attempt
    retries: int = 2  # a gate's command sent again (same seq) when no answer came


def send(broker: Broker, key: Ed25519PrivateKey, key_id: str, request: Request,
         out: TextIO, *, clock: Callable[[], float] = time.time) -> int:
    """Send one signed command and print its answer(s) as JSON lines.

    A gate: the first answer, exit 0 if it says ok, 3 if the gate refused, 1 if none came
    in time, after ``retries`` more attempts with the same seq. The fleet: every answer
    until the timeout, exit 1 if none came (sent once: every gate would answer again).
    """
    now = int(clock() * 1000)
    body = contract.CommandBody(target=request.target, seq=request.seq, issued_at=now,
                                expires_at=now + request.ttl_s * 1000, name=request.name,
                                args=request.args)
    payload = sign(key, key_id, body).encode()
    if len(payload) > contract.MAX_COMMAND_BYTES:
        raise ConfigError("command", request.name, f"is {len(payload)} bytes signed; a gate "
                          f"refuses more than {contract.MAX_COMMAND_BYTES}")
    fleet = request.target == contract.FLEET
    topic = contract.fleet_cmd_topic() if fleet else contract.cmd_topic(request.target)
    nonce = secrets.token_hex(16)
    reply_topic = f"{contract.reply_topic(request.target)}/{nonce}"
    # Each gate answers under its own reply topic, which the broker lets only that gate
    # write: a fleet command's answers are read from every gate's, and each answer is
    # taken only from the topic of the gate it names.
    answers_topic = contract.topic("+", f"reply/{nonce}") if fleet else reply_topic
    correlation = bytes.fromhex(nonce)

    replies: list[dict[str, Any]] = []
    ready, answered, lock = threading.Event(), threading.Event(), threading.Lock()
    failure: list[str] = []

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                   properties: Any) -> None:
        if reason.is_failure:
            failure.append(f"{broker} refused the connection: {reason}")
            ready.set()
            return
        client.subscribe(answers_topic, options=SubscribeOptions(qos=1))

    def on_subscribe(client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                     properties: Any) -> None:
        if any(r.is_failure for r in reasons):
            failure.append(f"subscription to {answers_topic} refused: {reasons[0]}")
        ready.set()

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if getattr(msg.properties, "CorrelationData", None) != correlation:
            return
        try:
            reply = json.loads(msg.payload)
        except (ValueError, RecursionError):  # raised here, it would end paho's thread
            log.warning("an answer that is not JSON: %r", msg.payload[:200])
            return
        if not isinstance(reply, dict):
            return
        sender = msg.topic.split("/")[2]
        if sender == contract.FLEET or reply.get("gate") != sender:
            log.warning("an answer on %s in the name of gate %r: ignored", msg.topic,
                        reply.get("gate"))
            return
        with lock:
            replies.append(reply)
            out.write(json.dumps(reply, sort_keys=True) + "\n")
            out.flush()
        if not fleet:
            answered.set()

    client = new_client(broker, f"tapgate-operator-{nonce[:12]}")
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(broker.host, broker.port, broker.keepalive, clean_start=True,
                       properties=connect_properties())
    except OSError as err:
        raise SyncError(f"cannot reach {broker}: {err}") from err
    client.loop_start()
    try:
        if not ready.wait(request.timeout_s) or failure:
            raise SyncError(failure[0] if failure else f"{broker} did not answer in time")
        for attempt in range(1 + (0 if fleet else max(0, request.retries))):
            if attempt and clock() * 1000 >= body.expires_at:
                break  # the gate would only say "expired", whatever it did the first time
            if attempt:
                log.warning("no answer to %s seq %d within %.0f s: sending it again (the "
                            "same seq: applied once at most)", request.name, request.seq,
                            request.timeout_s)
            info = client.publish(topic, payload, qos=1, properties=publish_properties(
                response_topic=reply_topic, correlation=correlation))
            log.info("sent %s seq %d to %s (reply on %s)", request.name, request.seq, topic,
                     reply_topic)
            deadline = time.monotonic() + request.timeout_s
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(request.timeout_s)
            if answered.wait(max(0.0, deadline - time.monotonic())):
                break
    finally:
        client.disconnect()
        client.loop_stop()
    if not replies:
        log.error("no answer to %s seq %d within %.0f s", request.name, request.seq,
                  request.timeout_s)
        return EXIT_NO_ANSWER
    if fleet:
        return EXIT_OK
    return EXIT_OK if replies[0].get("ok") is True else EXIT_REFUSED
