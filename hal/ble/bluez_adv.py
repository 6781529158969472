"""The advertisement object BlueZ calls back, and its registration as one thing.

:class:`LEAdvertisement` is ``org.bluez.LEAdvertisement1`` for one slot. bluetoothd reads
it with ``Properties.GetAll`` when it is registered and then follows its
``PropertiesChanged`` (changed values are re-parsed, invalidated ones cleared), so an
instance on air is changed in place, never registered twice. GetAll must return exactly
the properties that apply: an unset Timeout, TxPower or interval, or an empty list, is
absent rather than zero. dbus-fast's ``disabled`` flag belongs to the class, so every
object keeps its own list of visible properties instead.

There is no ``Discoverable``: since BlueZ 5.50 a ``broadcast`` advertisement that asks
for the discoverable Flags is refused ("Broadcast cannot set flags", src/advertising.c),
and a beacon must not be connectable (``peripheral``).

:class:`Registration` exports the object and registers it with the adapter's
``LEAdvertisingManager1``; its :meth:`Registration.stop` undoes both.

No ``from __future__ import annotations`` here: dbus-fast reads the D-Bus signatures from
the annotations, and would take a postponed ``None`` for a signature.
"""

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

from dbus_fast import DBusError, Message, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusDict,
    DBusInt16,
    DBusSignature,
    DBusStr,
    DBusUInt16,
    DBusUInt32,
)
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from hal.ble.base import AdvertisingRequest
from hal.ble.bluez_errors import raise_for_reply

BLUEZ = "org.bluez"
ADVERTISEMENT_IFACE = "org.bluez.LEAdvertisement1"
MANAGER_IFACE = "org.bluez.LEAdvertisingManager1"
# Unregistering these is already done: BlueZ forgot it, or BlueZ / the adapter is gone.
ALREADY_GONE = {"org.bluez.Error.DoesNotExist", "org.freedesktop.DBus.Error.ServiceUnknown",
                "org.freedesktop.DBus.Error.UnknownObject",
                "org.freedesktop.DBus.Error.UnknownMethod"}

StrList = Annotated[list[str], DBusSignature("as")]
CompanyData = Annotated[dict[int, Variant], DBusSignature("a{qv}")]


def advertisement_properties(request: AdvertisingRequest, *, can_set_tx_power: bool,
                             timeout_s: int | None) -> dict[str, Any]:
    """What GetAll answers for ``request``: only the properties that apply."""
    adv = request.advertisement
    props: dict[str, Any] = {"Type": "broadcast"}  # non-connectable: a beacon
    if adv.service_uuids:
        props["ServiceUUIDs"] = list(adv.service_uuids)
    if adv.manufacturer_data:
        props["ManufacturerData"] = {int(cid): Variant("ay", bytes(data))
                                     for cid, data in adv.manufacturer_data.items()}
    if adv.service_data:
        props["ServiceData"] = {str(uuid): Variant("ay", bytes(data))
                                for uuid, data in adv.service_data.items()}
    if timeout_s is not None:
        props["Timeout"] = timeout_s
    if request.tx_power_dbm is not None and can_set_tx_power:
        props["TxPower"] = request.tx_power_dbm
    if request.interval_ms is not None:
        props["MinInterval"], props["MaxInterval"] = request.interval_ms
    return props


class LEAdvertisement(ServiceInterface):
    def __init__(self, values: Mapping[str, Any],
                 on_release: Callable[["LEAdvertisement"], None]) -> None:
        super().__init__(ADVERTISEMENT_IFACE)
        self._declared = tuple(ServiceInterface._get_properties(self))
        self._values: dict[str, Any] = {}
        self._on_release = on_release
        self.released = False  # BlueZ called Release: it has dropped the advertisement
        self._show(values)

    @property
    def values(self) -> Mapping[str, Any]:
        return dict(self._values)

    def change(self, values: Mapping[str, Any], *, rearm: bool) -> list[str]:
        """Show ``values`` and signal what changed; ``rearm`` re-sends Timeout even when it
        is the same number (BlueZ restarts the window on every Timeout it is sent).
        Returns the names signalled."""
        old = self._values
        changed = {name: value for name, value in values.items()
                   if old.get(name) != value or (rearm and name == "Timeout")}
        gone = [name for name in old if name not in values]
        self._show(values)
        if changed or gone:
            self.emit_properties_changed(changed, gone)
        return sorted(changed) + gone

    def _show(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)
        visible = ServiceInterface._get_properties(self)  # this object's own list
        visible[:] = [prop for prop in self._declared if prop.name in self._values]

    @dbus_method(name="Release")
    def release(self) -> None:
        self.released = True
        self._on_release(self)

    @dbus_property(access=PropertyAccess.READ, name="Type")
    def type_(self) -> DBusStr:
        return str(self._values["Type"])

    @dbus_property(access=PropertyAccess.READ, name="ServiceUUIDs")
    def service_uuids(self) -> StrList:
        return list(self._values["ServiceUUIDs"])

    @dbus_property(access=PropertyAccess.READ, name="ManufacturerData")
    def manufacturer_data(self) -> CompanyData:
        return dict(self._values["ManufacturerData"])

    @dbus_property(access=PropertyAccess.READ, name="ServiceData")
    def service_data(self) -> DBusDict:
        return dict(self._values["ServiceData"])

    @dbus_property(access=PropertyAccess.READ, name="Timeout")
    def timeout(self) -> DBusUInt16:
        return int(self._values["Timeout"])

    @dbus_property(access=PropertyAccess.READ, name="TxPower")
    def tx_power(self) -> DBusInt16:
        return int(self._values["TxPower"])

    @dbus_property(access=PropertyAccess.READ, name="MinInterval")
    def min_interval(self) -> DBusUInt32:
        return int(self._values["MinInterval"])

    @dbus_property(access=PropertyAccess.READ, name="MaxInterval")
    def max_interval(self) -> DBusUInt32:
        return int(self._values["MaxInterval"])


async def bluez_call(bus: MessageBus, path: str, interface: str, member: str,
                     signature: str = "", body: Sequence[Any] = (), *,
                     timeout_s: float, destination: str = BLUEZ) -> Message:
    """One method call; an error reply is raised as DBusError, no answer as TimeoutError."""
    message = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=list(body))
    reply = await asyncio.wait_for(bus.call(message), timeout_s)
    return raise_for_reply(reply)


class Registration:
    """``adv`` exported at ``path`` and registered with the adapter at ``adapter_path``."""

    def __init__(self, bus: MessageBus, adapter_path: str, path: str, adv: LEAdvertisement,
                 timeout_s: float) -> None:
        self.bus = bus
        self.adapter_path = adapter_path
        self.path = path
        self.adv = adv
        self._timeout_s = timeout_s
        self._registered = True
        self._stopped = False

    @classmethod
    async def start(cls, bus: MessageBus, *, adapter_path: str, path: str,
                    adv: LEAdvertisement, timeout_s: float) -> "Registration":
        """Export, then register: BlueZ calls GetAll on the object before it answers."""
        bus.export(path, adv)
        try:
            await bluez_call(bus, adapter_path, MANAGER_IFACE, "RegisterAdvertisement",
                             "oa{sv}", [path, {}], timeout_s=timeout_s)
        except BaseException:
            bus.unexport(path, adv)
            raise
        return cls(bus, adapter_path, path, adv, timeout_s)

    def forget(self) -> None:
        """BlueZ no longer holds it (it went away): stop() will only unexport."""
        self._registered = False

    async def stop(self) -> None:
        """Unregister (unless BlueZ already dropped it) and unexport; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self._registered and not self.adv.released and self.bus.connected:
                try:
                    await bluez_call(self.bus, self.adapter_path, MANAGER_IFACE,
                                     "UnregisterAdvertisement", "o", [self.path],
                                     timeout_s=self._timeout_s)
                except DBusError as err:
                    if err.type not in ALREADY_GONE:
                        raise
        finally:
            self.bus.unexport(self.path, self.adv)
