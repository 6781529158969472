"""The MQTT v5 client both ends of the contract use (paho-mqtt 2.x): how one is made,
with TLS, and the CONNECT and PUBLISH properties the contract puts on the wire.

The gate's uplink (daemon.sync.link) and the head-end (headend.mqtt and its tools)
connect through these; what each then does with its connection (reconnecting, what it
subscribes to, its Last Will) stays with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """What a TLS connection is set up from: the CA to trust (None: the system's), and
    this client's certificate and key (None: no client certificate)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


def new_client(client_id: str, *, tls: TlsFiles | None = None, userdata: Any = None,
               manual_ack: bool = False, reconnect_on_failure: bool = True) -> mqtt.Client:
    """An MQTT v5 client with paho's version-2 callbacks, TLS set up when ``tls`` is
    given. The TLS files are read here: OSError or ValueError when they cannot be used,
    for the caller to say which of its settings named them."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5, userdata=userdata, manual_ack=manual_ack,
                         reconnect_on_failure=reconnect_on_failure)
    if tls is not None:
        client.tls_set(ca_certs=_path(tls.ca), certfile=_path(tls.cert),
                       keyfile=_path(tls.key))
    return client


def connect_properties(*, session_expiry_s: int = 0, receive_maximum: int | None = None,
                       maximum_packet_size: int | None = None) -> Properties:
    """CONNECT's properties: the session expiry is always sent (0: the broker forgets
    the session with the connection)."""
    props = _properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    if maximum_packet_size is not None:
        props.MaximumPacketSize = maximum_packet_size
    return props


def publish_properties(*, response_topic: str | None = None,
                       correlation: bytes | None = None) -> Properties:
    """PUBLISH's properties for a request (where to answer) or an answer (what it
    answers)."""
    props = _properties(PacketTypes.PUBLISH)
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    return props


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def _path(path: Path | None) -> str | None:
    return str(path) if path is not None else None
