"""Connecting the head-end's MQTT v5 clients: the broker's address as operators write it,
and a client that reconnects by itself. The client itself, TLS and the properties are
the gate's too (protocol.mqtt)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from protocol import mqtt as transport
from protocol.errors import ConfigError
from protocol.mqtt import TlsFiles

PLAIN_PORT = 1883
TLS_PORT = 8883
TOPIC_WILDCARDS = ("/", "+", "#", "\0")


def _not_shutdown_noise(record: logging.LogRecord) -> bool:
    # paho 2.2's network loop logs this at ERROR on every clean disconnect; the head-end
    # reports lost connections itself (on_disconnect).
    return not record.getMessage().startswith("Client is not connected")


_PAHO_LOG = logging.getLogger("tapgate.headend.paho")
_PAHO_LOG.addFilter(_not_shutdown_noise)


@dataclass(frozen=True, slots=True)
class Broker:
    host: str
    port: int
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive: int = 30

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker(text: str, *, tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None) -> Broker:
    """``HOST``, ``HOST:PORT`` or ``[IPv6]:PORT``; the port defaults to 1883, or 8883 with
    TLS."""
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert/--tls-key", str(tls_cert or tls_key),
                          "a client certificate needs its key, and a key its certificate")
    default = TLS_PORT if (tls_ca or tls_cert) else PLAIN_PORT
    try:
        port = int(port_text) if port_text else default
    except ValueError:
        port = -1
    if not host or not 0 < port < 65536:
        raise ConfigError("--broker", text, "expected HOST:PORT")
    return Broker(host, port, tls_ca, tls_cert, tls_key)


def check_topic_level(what: str, name: str) -> str:
    if not name or any(c in name for c in TOPIC_WILDCARDS):
        raise ConfigError(what, name, "must be one MQTT topic level, without / + #")
    return name


def new_client(broker: Broker, client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
    """A client for ``broker``, reconnecting by itself (paho's own loop: the head-end
    has no outbox to drain between two connections)."""
    tls = TlsFiles(broker.tls_ca, broker.tls_cert, broker.tls_key) if broker.tls else None
    try:
        client = transport.new_client(client_id, tls=tls, manual_ack=manual_ack)
    except (OSError, ValueError) as err:
        raise ConfigError("--tls-ca/--tls-cert/--tls-key", str(broker.tls_ca),
                          f"cannot be used: {err}") from err
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.enable_logger(_PAHO_LOG)  # it says why a connection failed (TLS, refused)
    return client
