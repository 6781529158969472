"""Advertising through BlueZ's D-Bus API (``org.bluez.LEAdvertisingManager1``) with dbus-fast.

Each slot is one :class:`~hal.ble.bluez_adv.LEAdvertisement` exported at
``/org/tapgate/advertisement/<slot>`` and registered with the adapter; a slot already on
air is changed in place with PropertiesChanged. Windows are BlueZ's ``Timeout``: BlueZ
calls ``Release`` when it ends (EXPIRED). Our own timer withdraws the slot a margin later
in case bluetoothd never does.

bluetoothd going away (``Release`` before a window's end, as bluetoothd does on every
advertisement when it stops; ``NameOwnerChanged`` for org.bluez when it dies) or the
adapter disappearing (``InterfacesRemoved``) is LOST for every slot; the slots stay in
:meth:`on_air` and their windows keep running. When the adapter is back (a new owner of
org.bluez, or ``InterfacesAdded`` for the adapter, which can come a moment later) every
slot still wanted is registered again with what is left of its window: RESTORED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from hal.ble import bluez_errors as errors
from hal.ble.base import AdapterInfo, AdvertisingRequest, BeaconEvent, Listener, Listeners
from hal.ble.bluez_adv import (
    BLUEZ,
    MANAGER_IFACE,
    LEAdvertisement,
    Registration,
    advertisement_properties,
    bluez_call,
)
from hal.ble.sim import describe
from protocol.errors import HardwareUnavailable, TapgateError

log = logging.getLogger("tapgate.beacon")

ADAPTER_IFACE = "org.bluez.Adapter1"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
ADVERTISEMENT_ROOT = "/org/tapgate/advertisement"
RELEASE_TOLERANCE_S = 1.5  # a Release this close to the window's end is its Timeout
MATCH_RULES = (
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    "member='NameOwnerChanged',arg0='org.bluez'",
    f"type='signal',sender='{BLUEZ}',interface='{OBJECT_MANAGER_IFACE}',path='/'",
)


def advertisement_path(slot: str) -> str:
    """Where a slot's advertisement is exported (object paths take [A-Za-z0-9_] only)."""
    return f"{ADVERTISEMENT_ROOT}/{re.sub(r'[^A-Za-z0-9_]', '_', slot)}"


@dataclass
class _Slot:
    name: str
    path: str
    request: AdvertisingRequest
    registration: Registration | None = None
    deadline: float | None = None  # loop time the window ends
    timer: asyncio.TimerHandle | None = None
    announced: bool = False  # REGISTERED was emitted


class BluezAdvertiser:
    def __init__(self, *, adapter: str = "hci0", bus_address: str | None = None,
                 call_timeout_s: float = 10.0, release_margin_s: float = 2.0) -> None:
        self._adapter = adapter
        self._adapter_path = f"/org/bluez/{adapter}"
        self._bus_address = bus_address
        self._call_timeout_s = call_timeout_s
        self._release_margin_s = release_margin_s
        self._bus: MessageBus | None = None
        self._info: AdapterInfo | None = None
        self._bluez_up = False
        self._closing = False
        self._slots: dict[str, _Slot] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners = Listeners()

    @property
    def unique_name(self) -> str | None:
        """Our connection's name on the bus: where BlueZ calls the advertisements back."""
        return self._bus.unique_name if self._bus is not None else None

    # -- the Advertiser contract ----------------------------------------------------------
    async def open(self) -> AdapterInfo:
        """Connect and read the adapter; after close() it can be opened again."""
        if self._info is not None:
            if self._bus is not None and self._bus.connected:
                return self._info
            await self.close()  # the system bus went away under us: start afresh
        self._lock = asyncio.Lock()
        bus = self._bus_address or errors.system_bus_address()
        with errors.translated(adapter=self._adapter, doing="connecting to the system bus",
                               bus=bus):
            self._bus = await self._connect()
        try:
            self._info = await self._read_adapter()
        except BaseException:
            await self._disconnect()
            raise
        self._bluez_up = True
        self._spawn(self._watch_bus(self._bus))
        return self._info

    async def advertise(self, slot: str, request: AdvertisingRequest) -> None:
        self._require_open()
        async with self._lock:
            state = self._slots.get(slot)
            if state is None:
                await self._add(slot, request)
                return
            registration = state.registration
            released = registration is not None and registration.adv.released
            window_over = self._window_over(state)
            state.request = request
            self._arm(state)
            if registration is None or (released and not window_over):
                return  # bluetoothd is away (or going): on air like this when it is back
            if released:  # BlueZ ended the old window a moment ago: this opens a new one
                await self._replace(state)
                changed = ["registered again"]
            else:
                changed = registration.adv.change(self._values(request, request.timeout_s),
                                                  rearm=request.timeout_s is not None)
            log.debug("beacon %s updated (%s): %s", slot, ", ".join(changed) or "no change",
                      describe(request))
            self._listeners.emit(slot, BeaconEvent.UPDATED)

    async def withdraw(self, slot: str) -> None:
        async with self._lock:
            state = self._slots.pop(slot, None)
            if state is None:
                return
            self._disarm(state)
            try:
                await self._stop(state, doing=f"withdrawing {slot!r}")
            except TapgateError:
                self._listeners.emit(slot, BeaconEvent.FAILED)
                raise
            log.info("beacon %s withdrawn", slot)
            self._listeners.emit(slot, BeaconEvent.WITHDRAWN)

    def on_air(self) -> Mapping[str, AdvertisingRequest]:
        return {name: state.request for name, state in self._slots.items()}

    def subscribe(self, listener: Listener) -> None:
        self._listeners.add(listener)

    async def close(self) -> None:
        if self._info is None:
            return
        for slot in list(self._slots):
            try:
                await self.withdraw(slot)
            except TapgateError as err:
                log.warning("beacon %s: %s", slot, err)
        self._closing = True
        try:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._disconnect()
        finally:
            self._info, self._bluez_up, self._closing = None, False, False

    # -- the bus and the adapter -------------------------------------------------------------
    async def _connect(self) -> MessageBus:
        if self._bus_address:
            bus = MessageBus(bus_address=self._bus_address)
        else:  # honours DBUS_SYSTEM_BUS_ADDRESS
            bus = MessageBus(bus_type=BusType.SYSTEM)
        await asyncio.wait_for(bus.connect(), self._call_timeout_s)
        bus.add_message_handler(self._on_message)
        for rule in MATCH_RULES:
            await bluez_call(bus, "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch",
                             "s", [rule], destination="org.freedesktop.DBus",
                             timeout_s=self._call_timeout_s)
        return bus

    async def _disconnect(self) -> None:
        bus, self._bus = self._bus, None
        if bus is None:
            return
        bus.remove_message_handler(self._on_message)
        bus.disconnect()
        disconnected: Callable[[], Awaitable[None]] = bus.wait_for_disconnect
        with contextlib.suppress(Exception):
            await asyncio.wait_for(disconnected(), self._call_timeout_s)

    async def _watch_bus(self, bus: MessageBus) -> None:
        """The system bus itself going away (dbus restarted) is LOST until reopened."""
        disconnected: Callable[[], Awaitable[None]] = bus.wait_for_disconnect
        with contextlib.suppress(Exception):
            # shielded: cancelling this task must not cancel the bus's own future
            await asyncio.shield(disconnected())
        if bus is self._bus and not self._closing:
            await self._lost("the system bus connection closed (dbus restarted?); "
                             "tapgate must open the advertiser again", bus_gone=True)

    async def _read_adapter(self) -> AdapterInfo:
        """The adapter as bluetoothd has it now; powered on if it was off."""
        doing = f"reading adapter {self._adapter}"
        with errors.translated(adapter=self._adapter, doing=doing):
            reply = await self._call("/", OBJECT_MANAGER_IFACE, "GetManagedObjects")
        objects: dict[str, dict[str, dict[str, Any]]] = reply.body[0]
        adapters = sorted(path.rsplit("/", 1)[-1] for path, ifaces in objects.items()
                          if ADAPTER_IFACE in ifaces)
        ifaces = objects.get(self._adapter_path, {})
        if ADAPTER_IFACE not in ifaces:
            raise errors.adapter_missing(self._adapter, adapters)
        if MANAGER_IFACE not in ifaces:
            raise errors.no_advertising(self._adapter)
        adapter = {k: v.value for k, v in ifaces[ADAPTER_IFACE].items()}
        manager = {k: v.value for k, v in ifaces[MANAGER_IFACE].items()}
        if not adapter.get("Powered", False):
            await self._power_on()
        caps = {k: v.value for k, v in manager.get("SupportedCapabilities", {}).items()}
        info = AdapterInfo(
            name=self._adapter, address=str(adapter.get("Address", "")), powered=True,
            can_set_tx_power="CanSetTxPower" in manager.get("SupportedFeatures", []),
            supported_instances=int(manager.get("SupportedInstances", 0)),
            max_adv_len=int(caps.get("MaxAdvLen", 31)))
        log.info("beacon adapter %s %r (%s): %d advertising instances free, max %d bytes, "
                 "TX power %s", self._adapter, adapter.get("Name", ""), info.address,
                 info.supported_instances, info.max_adv_len,
                 "settable" if info.can_set_tx_power else "fixed")
        return info

    async def _power_on(self) -> None:
        log.warning("beacon adapter %s is powered off: powering it on", self._adapter)
        try:
            await self._call(self._adapter_path, PROPERTIES_IFACE, "Set", "ssv",
                             [ADAPTER_IFACE, "Powered", Variant("b", True)])
        except Exception as err:
            why = errors.translate(err, adapter=self._adapter, doing="powering on")
            raise errors.powered_off(self._adapter, str(why)) from err

    async def _call(self, path: str, interface: str, member: str, signature: str = "",
                    body: list[Any] | None = None) -> Message:
        if self._bus is None or not self._bus.connected:
            raise HardwareUnavailable("ble", "not connected to the system bus")
        return await bluez_call(self._bus, path, interface, member, signature, body or [],
                                timeout_s=self._call_timeout_s)

    def _require_open(self) -> None:
        if self._info is None:
            raise HardwareUnavailable("ble", "the BlueZ advertiser is not open")
        if self._bus is None or not self._bus.connected:
            raise HardwareUnavailable("ble", "the system bus connection is closed (dbus "
                                             "restarted?): the advertiser must be reopened")

    # -- slots --------------------------------------------------------------------------------
    def _values(self, request: AdvertisingRequest, timeout_s: int | None) -> dict[str, Any]:
        assert self._info is not None
        return advertisement_properties(request, can_set_tx_power=self._info.can_set_tx_power,
                                        timeout_s=timeout_s)

    async def _add(self, slot: str, request: AdvertisingRequest) -> None:
        path = advertisement_path(slot)
        if any(other.path == path for other in self._slots.values()):
            raise ValueError(f"slot {slot!r} has the same D-Bus path as another slot: {path}")
        state = _Slot(slot, path, request)
        if self._bluez_up:
            try:
                await self._register(state, request.timeout_s)
            except TapgateError:
                self._listeners.emit(slot, BeaconEvent.FAILED)
                raise
        self._slots[slot] = state
        self._arm(state)
        if state.registration is None:
            log.info("beacon %s kept until bluetoothd is back: %s", slot, describe(request))
            return
        state.announced = True
        log.info("beacon %s on air: %s", slot, describe(request))
        self._listeners.emit(slot, BeaconEvent.REGISTERED)

    async def _register(self, state: _Slot, timeout_s: int | None) -> None:
        assert self._bus is not None
        adv = LEAdvertisement(self._values(state.request, timeout_s), self._on_release)
        doing = f"registering {state.name!r} on {self._adapter}"
        with errors.translated(adapter=self._adapter, doing=doing, slot=state.name):
            state.registration = await Registration.start(
                self._bus, adapter_path=self._adapter_path, path=state.path, adv=adv,
                timeout_s=self._call_timeout_s)

    async def _replace(self, state: _Slot) -> None:
        try:
            await self._stop(state, doing=f"replacing {state.name!r}")
            await self._register(state, state.request.timeout_s)
        except TapgateError:
            del self._slots[state.name]
            self._disarm(state)
            self._listeners.emit(state.name, BeaconEvent.FAILED)
            raise

    async def _stop(self, state: _Slot, *, doing: str) -> None:
        registration, state.registration = state.registration, None
        if registration is not None:
            with errors.translated(adapter=self._adapter, doing=doing, slot=state.name):
                await registration.stop()

    # -- windows ----------------------------------------------------------------------------
    def _arm(self, state: _Slot) -> None:
        """(Re)start the slot's window, with our fallback a margin after BlueZ's Timeout."""
        self._disarm(state)
        if state.request.timeout_s is None:
            return
        loop = asyncio.get_running_loop()
        state.deadline = loop.time() + state.request.timeout_s
        state.timer = loop.call_later(state.request.timeout_s + self._release_margin_s,
                                      self._spawn_window_over, state)

    def _disarm(self, state: _Slot) -> None:
        if state.timer is not None:
            state.timer.cancel()
        state.timer = state.deadline = None

    def _spawn_window_over(self, state: _Slot) -> None:
        state.timer = None
        self._spawn(self._expire(state, released=None))

    def _window_over(self, state: _Slot) -> bool:
        """Whether the slot's window has (about) ended: BlueZ counts it in whole seconds."""
        now = asyncio.get_running_loop().time()
        return state.deadline is not None and now >= state.deadline - RELEASE_TOLERANCE_S

    def _on_release(self, adv: LEAdvertisement) -> None:
        """BlueZ calls Release when the Timeout ends, and on every advertisement when its
        adapter goes away or bluetoothd stops (src/advertising.c: client_timeout,
        manager_destroy): a window not yet over means the second, LOST until it is back."""
        for state in self._slots.values():
            if state.registration is not None and state.registration.adv is adv:
                state.registration.forget()
                if self._window_over(state):
                    self._spawn(self._expire(state, released=adv))
                else:
                    self._spawn(self._lost(f"bluetoothd dropped {state.name!r} before its "
                                           "window ended: it is stopping, or adapter "
                                           f"{self._adapter} is going away"))
                return

    async def _expire(self, state: _Slot, *, released: LEAdvertisement | None) -> None:
        """The window is over: BlueZ ``released`` the advertisement, or our timer fired."""
        async with self._lock:
            if self._slots.get(state.name) is not state:
                return  # withdrawn meanwhile
            current = state.registration
            if released is not None and (current is None or current.adv is not released):
                return  # an advertise() put it on air again since
            if released is None and current is not None:
                if current.adv.released:
                    return  # the Release task is on its way
                log.warning("beacon %s: BlueZ did not release it after its window; "
                            "withdrawing it ourselves", state.name)
            del self._slots[state.name]
            self._disarm(state)
            try:
                await self._stop(state, doing=f"ending the window of {state.name!r}")
            except TapgateError as err:
                log.warning("beacon %s: %s", state.name, err)
            log.info("beacon %s: window over, off air", state.name)
            self._listeners.emit(state.name, BeaconEvent.EXPIRED)

    # -- bluetoothd going and coming back ------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        if msg.member == "NameOwnerChanged" and msg.interface == "org.freedesktop.DBus":
            name, old, new = msg.body
            if name == BLUEZ and old:
                self._spawn(self._lost("bluetoothd left the system bus"))
            if name == BLUEZ and new:
                self._spawn(self._restore())
        elif msg.interface == OBJECT_MANAGER_IFACE and msg.path == "/" and msg.body:
            if msg.body[0] != self._adapter_path:
                return
            if msg.member == "InterfacesAdded":
                self._spawn(self._restore())
            elif msg.member == "InterfacesRemoved" and ADAPTER_IFACE in msg.body[1]:
                self._spawn(self._lost(f"adapter {self._adapter} was removed"))

    async def _lost(self, why: str, *, bus_gone: bool = False) -> None:
        async with self._lock:
            if not self._bluez_up:
                return
            self._bluez_up = False
            log.error("beacon: %s; %d slot(s) off air until it is back", why, len(self._slots))
            for state in self._slots.values():
                if state.registration is not None:
                    state.registration.forget()
                    if bus_gone:  # its exports went with it; nothing can be sent any more
                        state.registration = None
                    with contextlib.suppress(TapgateError):
                        await self._stop(state, doing="forgetting it")
                self._listeners.emit(state.name, BeaconEvent.LOST)

    async def _restore(self) -> None:
        async with self._lock:
            if self._bluez_up or self._info is None or self._bus is None or not self._bus.connected:
                return
            try:
                self._info = await self._read_adapter()
            except TapgateError as err:
                log.info("beacon: bluetoothd is back but not ready yet (%s); waiting", err)
                return
            self._bluez_up = True
            log.info("beacon: adapter %s is back; restoring %d slot(s)", self._adapter,
                     len(self._slots))
            for state in list(self._slots.values()):
                await self._restore_slot(state)

    async def _restore_slot(self, state: _Slot) -> None:
        timeout_s: int | None = None
        if state.deadline is not None:
            left = state.deadline - asyncio.get_running_loop().time()
            if left < 1.0:
                return  # its window is over: the timer expires it
            timeout_s = math.ceil(left)
        try:
            await self._register(state, timeout_s)
        except TapgateError as err:
            log.error("beacon %s could not go back on air: %s", state.name, err)
            del self._slots[state.name]
            self._disarm(state)
            self._listeners.emit(state.name, BeaconEvent.FAILED)
            return
        event = BeaconEvent.RESTORED if state.announced else BeaconEvent.REGISTERED
        state.announced = True
        self._listeners.emit(state.name, event)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._closing:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

