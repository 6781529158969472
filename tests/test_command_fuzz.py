"""Fuzzing the gate's command path (issue 11, item 4): whatever comes on a command topic
is applied or refused with a reason, never a traceback.

In-process and cheap per example: the real Commands (parse, verify, the journal's
check-and-record, the handlers, the answer) on the sim rig with a real journal in a
temp dir; what they publish is collected. Three kinds of input: any bytes; JSON of
random shapes and depths (deeper than the parser's own limit too); and signed commands
close to valid (real signatures by a known key, every field then possibly mutated).
The bulk is marked slow (``make test`` runs it); the quick run is a sample of each.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.sync.handlers import HANDLERS
from protocol import contract
from protocol.command import Incoming
from tests.command_support import Operator, gate_in_process

QUICK = int(os.environ.get("TAPGATE_FUZZ_QUICK", "300"))  # examples per kind in the quick run
# the slow share: 28,600, with the quick run's 3 x 300 + 500: 30,000 (bytes are the
# cheapest per example; a near-valid one that is applied commits to the journal twice)
SLOW = {"bytes": 18_600, "json": 6_000, "near_valid": 4_000}
GATE = "0000DF000001"

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                     st.floats(allow_nan=False), st.text(max_size=20))
_json = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=30)


class Bench:
    """The gate's command handling and what it is fed; every example goes through
    :meth:`feed`, which holds the contract: an answer with ok or a reason, no traceback
    logged."""

    def __init__(self, directory: Path) -> None:
        # op signs with seqs that only grow, wild with any (one claimed near 2**63 would
        # make every later seq of its key a replay), other is a key the gate does not know
        self.op, self.wild, self.other = Operator(), Operator(), Operator()
        self.opened: list[int] = []
        self.rig, self.commands, self.published = gate_in_process(
            directory, [self.op, self.wild], gate_id=GATE, opened=self.opened)
        self.seq = itertools.count(1)
        self.tracebacks: list[logging.LogRecord] = []
        self.fed = 0

    def feed(self, topic: str, payload: bytes) -> None:
        before = len(self.published)
        reply = self.commands.handle(Incoming(topic, payload,
                                              contract.reply_topic(GATE) + "/fuzz", b"c"))
        self.fed += 1
        said = self.published[before:]
        assert len(said) == 1, said  # one answer, or one report for the desired state
        if topic == contract.desired_topic(GATE):
            assert reply is None
            report = json.loads(said[0][1])
            assert "refused" not in report or report["refused"]["reason"]
        else:
            assert reply is not None and (reply.ok or reply.reason), reply
            assert json.loads(said[0][1]) == json.loads(reply.encode())
        assert not self.tracebacks, self.tracebacks[0].getMessage()

    def close(self) -> None:
        self.rig.close()


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    b = Bench(tmp_path)
    handler = logging.Handler()
    handler.emit = lambda record: b.tracebacks.append(record) if record.exc_info else None  # type: ignore[method-assign]
    logger = logging.getLogger("tapgate")
    logger.addHandler(handler)
    try:
        yield b
    finally:
        logger.removeHandler(handler)
        b.close()


TOPICS = st.sampled_from([contract.cmd_topic(GATE), contract.fleet_cmd_topic(),
                          contract.desired_topic(GATE)])


def fuzz(examples: int, **strategies: st.SearchStrategy[Any]
         ) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return lambda test: settings(max_examples=examples, deadline=None, database=None,
                                 suppress_health_check=list(HealthCheck))(
        given(**strategies)(test))


def run_bytes(bench: Bench, n: int) -> None:
    @fuzz(n, topic=TOPICS, payload=st.one_of(
        st.binary(max_size=600),
        # about the size limit: a few random bytes repeated (cheap to draw)
        st.tuples(st.integers(contract.MAX_COMMAND_BYTES - 2, contract.MAX_COMMAND_BYTES + 2),
                  st.binary(min_size=1, max_size=16)).map(
            lambda t: (t[1] * (t[0] // len(t[1]) + 1))[:t[0]])))
    def check(topic: str, payload: bytes) -> None:
        bench.feed(topic, payload)

    check()


def run_json(bench: Bench, n: int) -> None:
    @fuzz(n, topic=TOPICS, value=_json, depth=st.integers(0, 3000),
          shape=st.sampled_from(["value", "nested", "envelope"]))
    def check(topic: str, value: Any, depth: int, shape: str) -> None:
        if shape == "nested":
            text = "[" * depth + json.dumps(value) + "]" * depth
        elif shape == "envelope":  # the shape of a command, with random contents
            text = json.dumps({"key_id": value, "body": {"args": value, "seq": value},
                               "sig": value})
        else:
            text = json.dumps(value)
        bench.feed(topic, text.encode())

    check()


def _mutate(draw: st.DrawFn, obj: dict[str, Any]) -> None:
    """Change, drop or add one field of ``obj`` (the envelope or its body)."""
    key = draw(st.sampled_from(sorted(obj)))
    how = draw(st.sampled_from(["change", "drop", "add"]))
    if how == "change":
        obj[key] = draw(_json)
    elif how == "drop":
        del obj[key]
    else:
        obj[draw(st.text(max_size=8))] = draw(_json)


def _args(name: str) -> st.SearchStrategy[dict[str, Any]]:
    plausible = {
        "set_config": st.dictionaries(st.sampled_from(
            ["gate.fares.adult", "gate.fares.staff", "gate.anti_passback_s",
             "gate.recovery_window_s", "sam.key", "gate"]), _scalars, max_size=3),
        "denylist": st.fixed_dictionaries({
            "from_version": st.integers(-1, 3), "to_version": st.integers(-1, 4),
            "add": st.lists(st.sampled_from(["8801000000000001", "88010000000000", "zz"]),
                            max_size=3)}),
        "desired": st.fixed_dictionaries({"version": st.integers(-1, 10**6),
                                          "config": st.dictionaries(st.sampled_from(
                                              ["gate.fares.adult", "x"]), _scalars)}),
    }
    return plausible.get(name, st.dictionaries(st.text(max_size=8), _json, max_size=3))


def run_near_valid(bench: Bench, n: int) -> None:
    names = [*HANDLERS, "desired", "self_destruct"]

    @st.composite
    def commands(draw: st.DrawFn) -> tuple[str, bytes]:
        topic = draw(TOPICS)
        name = draw(st.sampled_from(names))
        now = int(time.time() * 1000)
        growing = draw(st.sampled_from([True, True, False]))
        seq = next(bench.seq) if growing else draw(st.integers(0, 2**63 - 1))
        aimed = contract.FLEET if topic == contract.fleet_cmd_topic() else GATE
        body: dict[str, Any] = {
            "target": draw(st.sampled_from([aimed, aimed, aimed, contract.FLEET,
                                            "000000FFFFFF"])),
            "seq": seq, "issued_at": now + draw(st.sampled_from([0, 0, 0, -120_000, 120_000])),
            "expires_at": now + draw(st.sampled_from([60_000, 60_000, 60_000, -1_000])),
            "name": name, "args": draw(_args(name))}
        signer = draw(st.sampled_from([bench.op if growing else bench.wild] * 3
                                      + [bench.other]))
        envelope = {"key_id": signer.key_id, "body": body,
                    "sig": signer.key.sign(contract.canonical(body)).hex()}
        # 0: signed and sent as it is (applied, or refused for its contents)
        for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
            _mutate(draw, draw(st.sampled_from([envelope, body])))
        return topic, json.dumps(envelope).encode()

    @fuzz(n, message=commands())
    def check(message: tuple[str, bytes]) -> None:
        bench.feed(*message)

    check()


RUNS = {"bytes": run_bytes, "json": run_json, "near_valid": run_near_valid}


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_fuzz_commands_quick(bench: Bench, kind: str) -> None:
    RUNS[kind](bench, QUICK)
    assert bench.fed >= QUICK


def test_fuzz_near_valid_commands_apply_some(bench: Bench) -> None:
    """The near-valid commands are not all refused: the fuzzing reaches the handlers."""
    run_near_valid(bench, 500)
    stats = bench.commands.stats
    assert stats.applied > 0 and stats.refused > 0, stats


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(RUNS))
def test_fuzz_commands_bulk(bench: Bench, kind: str) -> None:
    RUNS[kind](bench, SLOW[kind])
    assert bench.fed >= SLOW[kind]
