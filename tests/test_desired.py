"""The desired state on the gate, in process (a real journal, paho's hand-over as it
comes): a version is applied once, with one content. The broker-borne whole is in
test_commands.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from daemon.journal import Journal
from daemon.sync.desired import Desired
from daemon.sync.handlers import GateControl
from headend import command, keys
from protocol import contract
from protocol.command import Incoming, Verifier
from tests.configs import gate_config
from tests.rig import Rig

GATE = "000000D00001"


class Shadow:
    """An operator's desired states for one gate, and what the gate reported."""

    def __init__(self, rig: Rig, key: Ed25519PrivateKey) -> None:
        self.rig, self.key, self.seq = rig, key, 0
        self.reported: list[dict[str, Any]] = []
        self.desired = self._desired()

    def _desired(self) -> Desired:
        def publish(topic: str, payload: bytes, **kw: Any) -> bool:
            self.reported.append(json.loads(payload))
            return True

        verifier = Verifier(gate_id=GATE, keys={keys.key_id(self.key): keys.public_raw(
            self.key)}, clock_skew_s=60)
        return Desired(gate_id=GATE, verifier=verifier, journal=self.rig.journal,
                       control=GateControl(processor=self.rig.processor,
                                           config=self.rig.config, telemetry=dict),
                       publish=publish)

    def send(self, version: int, config: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        now = int(time.time() * 1000)
        body = contract.CommandBody(target=GATE, seq=self.seq, issued_at=now,
                                    expires_at=now + 60_000, name="desired",
                                    args={"version": version, "config": config})
        payload = command.sign(self.key, keys.key_id(self.key), body).encode()
        return self.desired.handle(Incoming(contract.desired_topic(GATE), payload))

    def restart(self) -> None:
        self.rig.restart()
        self.desired = self._desired()


def test_a_version_given_other_content_is_refused_not_taken_as_applied(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path, config=gate_config(terminal_id=bytes.fromhex(GATE)))
    shadow = Shadow(rig, Ed25519PrivateKey.generate())
    try:
        assert shadow.send(3, {"gate.fares.adult": 333}) == {"version": 3}
        # the same version and content, signed again (a new seq): reported as running
        assert shadow.send(3, {"gate.fares.adult": 333}) == {"version": 3}
        refused = shadow.send(3, {"gate.fares.adult": 111})
        assert refused == {"version": 3, "refused": {"version": 3, "reason": (
            "version 3 is running with other content; a change needs a new version")}}
        assert shadow.reported[-1] == refused
        assert rig.journal.remote_config() == {"gate.fares.adult": 333}
        shadow.restart()  # the digest is in the journal, with the version
        assert shadow.send(3, {"gate.fares.adult": 111})["refused"]["version"] == 3
        assert shadow.send(3, {"gate.fares.adult": 333}) == {"version": 3}
        assert shadow.send(4, {"gate.fares.adult": 111}) == {"version": 4}
        assert rig.journal.remote_config() == {"gate.fares.adult": 111}
    finally:
        rig.close()
    with Journal(rig.journal_path) as journal:
        assert journal.desired_version() == 4
