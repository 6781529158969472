"""The BLE advertiser contract every backend (``sim``, ``bluez``) fulfils.

An advertiser puts advertising instances on air, one per *slot* (a name such as
``"ibeacon"`` or ``"eddystone-eid"``). Calling :meth:`Advertiser.advertise` on a slot that
is already on air changes it in place: that is how the EID rotates and how a new trigger
extends a window. Everything the radio does by itself (a window ending, bluetoothd going
away and coming back) is reported to subscribers as a :class:`BeaconEvent`.

:meth:`Advertiser.on_air` lists what tapgate wants on air: while the radio is lost (LOST
until RESTORED) the slots stay listed, and they go back on air by themselves.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from protocol.errors import HardwareUnavailable

if TYPE_CHECKING:
    from protocol.beacon.frames import Advertisement

KIND = "ble"
log = logging.getLogger("tapgate.beacon")


@dataclass(frozen=True, slots=True)
class AdvertisingRequest:
    advertisement: Advertisement
    timeout_s: int | None = None  # the triggered window (BlueZ's Timeout); None: until withdrawn
    tx_power_dbm: int | None = None  # applied only if the adapter can set it
    interval_ms: tuple[int, int] | None = None  # (MinInterval, MaxInterval)

    def __post_init__(self) -> None:
        # BlueZ takes Timeout as a uint16 of seconds (0 would mean "no timeout"), TX power
        # in -127..20 dBm and intervals of at least 20 ms (0x20 * 0.625 ms), min <= max.
        if self.timeout_s is not None and not 1 <= self.timeout_s <= 0xFFFF:
            raise ValueError(f"timeout_s {self.timeout_s} outside 1..65535 s")
        if self.tx_power_dbm is not None and not -127 <= self.tx_power_dbm <= 20:
            raise ValueError(f"tx_power_dbm {self.tx_power_dbm} outside -127..20 dBm")
        if self.interval_ms is not None:
            low, high = self.interval_ms
            if not 20 <= low <= high <= 10_485_759:
                raise ValueError(f"interval_ms {self.interval_ms}: need 20 <= min <= max ms")


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    name: str  # the adapter as configured ("hci0"), "sim" for the simulator
    address: str
    powered: bool
    can_set_tx_power: bool
    supported_instances: int  # advertising instances still free when opened
    max_adv_len: int


class BeaconEvent(enum.Enum):
    REGISTERED = "registered"  # a slot went on air
    UPDATED = "updated"  # a slot on air was changed in place (content or window)
    EXPIRED = "expired"  # its window ended (BlueZ released it, or our own timer did)
    WITHDRAWN = "withdrawn"  # withdraw() or close() took it off air
    LOST = "lost"  # bluetoothd or the adapter went away: the slot is off air, remembered
    RESTORED = "restored"  # registered again after bluetoothd or the adapter came back
    FAILED = "failed"  # it could not be put on air (again); the slot is forgotten


Listener = Callable[[str, BeaconEvent], None]


class BeaconError(HardwareUnavailable):
    """BlueZ (or the simulator) refused one advertisement: bad or too long data."""

    def __init__(self, slot: str, message: str) -> None:
        self.slot = slot
        super().__init__(KIND, f"advertisement {slot!r}: {message}")


class Listeners:
    """Subscribers to beacon events; one failing listener never stops the others."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def add(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, slot: str, event: BeaconEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(slot, event)
            except Exception:
                log.exception("beacon event listener failed on %s %s", slot, event.name)


class Advertiser(Protocol):
    async def open(self) -> AdapterInfo:
        """Connect and read the adapter; HardwareUnavailable says what to fix."""
        ...

    async def advertise(self, slot: str, request: AdvertisingRequest) -> None:
        """Put ``slot`` on air, or change it in place (and re-arm its window) if it is."""
        ...

    async def withdraw(self, slot: str) -> None:
        """Take ``slot`` off air; nothing happens if it is not on air."""
        ...

    def on_air(self) -> Mapping[str, AdvertisingRequest]:
        """What tapgate wants on air, slot by slot (kept while the radio is lost)."""
        ...

    def subscribe(self, listener: Listener) -> None: ...

    async def close(self) -> None:
        """Withdraw everything and disconnect."""
        ...
