"""The uplink's [mqtt] settings: their defaults, and a bad one named with its value
and why. And TLS against a real mosquitto: with client certificates, the broker's ACL
keeps each gate to its own topics; a TLS file that cannot be read is a SyncError that
names the setting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.config import validate
from daemon.journal import Journal
from daemon.sync.uplink import Uplink
from protocol.errors import ConfigError, SyncError
from tests.configs import raw_config
from tests.fixtures.mosquitto import Mosquitto
from tests.pki import make_pki
from tests.uplink_support import (
    HeadEnd,
    journal_uuids,
    mqtt_config,
    new_gate_id,
    refusals,
    running,
)
from tests.waiting import wait_until


# --- config --------------------------------------------------------------------------------
def test_mqtt_config_defaults_to_no_uplink_and_the_gate_id() -> None:
    config = validate(raw_config())
    assert not config.mqtt.enabled
    assert config.gate.gate_id == "000000A00001"
    raw = raw_config()
    raw["mqtt"] = {"host": "broker.example", "tls_ca": "/etc/ca.pem"}
    mqtt_cfg = validate(raw).mqtt
    assert mqtt_cfg.enabled and mqtt_cfg.uses_tls and mqtt_cfg.port == 1883
    assert (mqtt_cfg.batch_size, mqtt_cfg.window, mqtt_cfg.retention_days) == (100, 4, 30)
    assert Uplink(config=mqtt_cfg, gate_id="000000A00001",
                  journal=None).client_id == "000000A00001"  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "value", "why"), [
    ("port", 0, "between 1 and 65535"),
    ("port", "1883", "whole number"),
    ("host", "two words", "host name"),
    ("client_id", "a/b", "letters, digits"),
    ("batch_size", 0, "between 1 and"),
    ("window", 1000, "between 1 and 64"),
    ("keepalive_s", 1, "between 5 and"),
    ("retention_days", -1, "between"),
    ("tls", "yes", "true or false"),
    ("tls_cert", "/etc/gate.pem", "both mqtt.tls_cert and mqtt.tls_key"),
    ("reconnect_max_s", 0.1, "not be below mqtt.reconnect_min_s"),
    ("colour", "blue", "unknown key"),
])
def test_bad_mqtt_config_names_the_key_the_value_and_why(key: str, value: Any,
                                                          why: str) -> None:
    raw = raw_config()
    raw["mqtt"] = {"host": "broker.example", key: value}
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert err.value.key == f"mqtt.{key}" and err.value.value == value
    assert why in err.value.why


# --- TLS and the broker's ACL --------------------------------------------------------------
def test_over_tls_a_gate_syncs_its_own_topics_and_no_other_gates(
        tmp_path: Path, make_broker: Callable[..., Mosquitto],
        caplog: pytest.LogCaptureFixture) -> None:
    """Client certificates name the gates; the broker's ACL gives each gate only its own
    topics: a gate's uplink drains over TLS, and a gate posing as another gets nothing
    through (its entries stay pending on its disk)."""
    own, other = new_gate_id(), new_gate_id()
    pki = make_pki(tmp_path, own, "headend")
    acl = tmp_path / "acl"
    acl.write_text("pattern write tapgate/v1/%u/tx\npattern write tapgate/v1/%u/status\n"
                   "pattern read tapgate/v1/%u/ack\n\n"
                   "user headend\ntopic readwrite tapgate/v1/#\n", encoding="utf-8")
    ca = pki["ca"][0]
    broker = make_broker(  # user root: the files are in pytest's private temp dir
        "user root\nlistener {port} 127.0.0.1\n"
        f"cafile {ca}\ncertfile {pki['server'][0]}\nkeyfile {pki['server'][1]}\n"
        "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n"
        f"acl_file {acl}\n")
    standin = HeadEnd(broker, tls=(ca, *pki["headend"]))
    tls = {"tls_ca": ca, "tls_cert": pki[own][0], "tls_key": pki[own][1]}
    try:
        with Journal(tmp_path / "own.db") as mine, Journal(tmp_path / "other.db") as posing:
            mine.append_many(refusals(bytes.fromhex(own), 45))
            posing.append_many(refusals(bytes.fromhex(other), 45))
            honest = Uplink(config=mqtt_config(broker, **tls), gate_id=own, journal=mine)
            # the same certificate, but the topics (and client id) of another gate
            impostor = Uplink(config=mqtt_config(broker, **tls), gate_id=other,
                              journal=posing)
            with running(honest), running(impostor):
                wait_until(lambda: mine.pending_sync_count() == 0, "the drain over TLS")
                time.sleep(1.0)  # time enough for the impostor's batches, were they let in
                assert posing.pending_sync_count() == 45
            assert standin.uuids_of(own) == journal_uuids(mine)
            assert standin.uuids_of(other) == []
            assert impostor.stats.entries_acked == 0
    finally:
        standin.close()
    assert any("broker refuses" in r.getMessage() and other in r.getMessage()
               for r in caplog.records)


def test_a_bad_tls_file_is_a_sync_error_naming_the_settings(tmp_path: Path,
                                                            mosquitto: Mosquitto) -> None:
    with Journal(tmp_path / "journal.db") as journal:
        uplink = Uplink(config=mqtt_config(mosquitto, tls_ca=tmp_path / "missing-ca.pem"),
                        gate_id=new_gate_id(), journal=journal)
        with pytest.raises(SyncError, match=r"mqtt\.tls_ca"):
            uplink.run(threading.Event())
