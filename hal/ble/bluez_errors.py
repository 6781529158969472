"""Every failure of the BlueZ backend becomes a tapgate error here, and nowhere else.

:func:`translate` maps what dbus-fast raises (``DBusError`` replies from bluetoothd or the
bus daemon, no bus socket, a refused login, a call that never got an answer) to
:class:`HardwareUnavailable` with what an operator should do about it, or to
:class:`BeaconError` when BlueZ refused one advertisement. The conditions the backend finds
by looking (no such adapter, adapter off) get their messages here too. bleak's errors
(:mod:`hal.ble.scan`) come through here as well.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

from dbus_fast import DBusError, Message, MessageType
from dbus_fast.errors import AuthError, DBusFastError

from hal.ble.base import KIND, BeaconError
from protocol.errors import HardwareUnavailable, TapgateError

DEFAULT_SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"
CHECK_BLUETOOTHD = "is bluetoothd running? systemctl status bluetooth"
POLICY_HINT = ("install systemd/tapgate-bluez.conf as /etc/dbus-1/system.d/tapgate-bluez.conf "
               "and reload dbus (systemctl reload dbus)")

_NO_OWNER = {"org.freedesktop.DBus.Error.ServiceUnknown",
             "org.freedesktop.DBus.Error.NameHasNoOwner"}
_NO_OBJECT = {"org.freedesktop.DBus.Error.UnknownObject",
              "org.freedesktop.DBus.Error.UnknownInterface",
              "org.freedesktop.DBus.Error.UnknownMethod"}
_NO_ANSWER = {"org.freedesktop.DBus.Error.NoReply", "org.freedesktop.DBus.Error.Timeout",
              "org.freedesktop.DBus.Error.TimedOut"}
_REFUSED_HINTS = {
    "org.bluez.Error.InvalidArguments": "a property BlueZ could not take (tapgate bug?)",
    "org.bluez.Error.InvalidLength": "the frame is too long for the adapter",
    "org.bluez.Error.Failed": "BlueZ could not parse or start it; journalctl -u bluetooth "
                              "says why (data too long for the adapter?)",
    "org.bluez.Error.AlreadyExists": "this connection has it registered already (tapgate bug)",
    "org.bluez.Error.NotPermitted": "BlueZ does not allow it on this adapter",
}


def system_bus_address() -> str:
    """The system bus dbus-fast connects to when no address is given."""
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_SYSTEM_BUS


def raise_for_reply(reply: Message) -> Message:
    """A method reply as it is, an error reply raised as the DBusError it carries."""
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        raise DBusError(reply.error_name or "org.freedesktop.DBus.Error.Failed", text)
    return reply


def translate(err: BaseException, *, adapter: str, doing: str,
              slot: str | None = None, bus: str | None = None) -> HardwareUnavailable:
    """The tapgate error for ``err``, raised while ``doing`` (e.g. "registering 'ibeacon'")."""
    bus = bus or system_bus_address()
    if isinstance(err, HardwareUnavailable):
        return err
    bleak_dbus_error = getattr(err, "dbus_error", None)  # bleak's BleakDBusError
    if isinstance(bleak_dbus_error, str) and "." in bleak_dbus_error:
        err = DBusError(bleak_dbus_error, str(getattr(err, "dbus_error_details", "") or ""))
    if isinstance(err, AuthError):
        return HardwareUnavailable(KIND, f"the system bus at {bus} refused tapgate's login "
                                         f"({err}): run tapgate as a user the bus accepts")
    if isinstance(err, TimeoutError):
        return _no_answer(doing)
    if isinstance(err, (FileNotFoundError, ConnectionRefusedError)):
        return HardwareUnavailable(KIND, f"no D-Bus system bus at {bus} ({err.strerror}): "
                                         "is dbus running? systemctl status dbus")
    if isinstance(err, PermissionError):
        return HardwareUnavailable(KIND, f"no permission to connect to the system bus at "
                                         f"{bus}: {POLICY_HINT}")
    if isinstance(err, DBusError):
        return _from_dbus(err, adapter=adapter, doing=doing, slot=slot)
    if isinstance(err, (OSError, EOFError)):
        return HardwareUnavailable(KIND, f"the D-Bus connection broke while {doing} ({err!r}): "
                                         "is dbus running? systemctl status dbus")
    return HardwareUnavailable(KIND, f"{doing} failed: {err!r}")


def _from_dbus(err: DBusError, *, adapter: str, doing: str, slot: str | None
               ) -> HardwareUnavailable:
    name, text = err.type, err.text
    if name in _NO_OWNER:
        return HardwareUnavailable(KIND, f"bluetoothd is not on the system bus (nobody owns "
                                         f"org.bluez) while {doing}: {CHECK_BLUETOOTHD}")
    if name in _NO_OBJECT:
        return HardwareUnavailable(KIND, f"adapter {adapter} is gone while {doing} ({text}): "
                                         "is it plugged in and up? bluetoothctl list")
    if name in _NO_ANSWER:
        return _no_answer(doing)
    if name == "org.freedesktop.DBus.Error.AccessDenied":
        return HardwareUnavailable(KIND, f"the system bus denied {doing} ({text}): {POLICY_HINT}")
    if name == "org.bluez.Error.NotPermitted" and "maximum" in text.lower():
        return HardwareUnavailable(KIND, f"adapter {adapter} has no free advertising instance "
                                         f"({text}): another program holds them (bluetoothctl "
                                         "show: ActiveInstances) or configure fewer frames")
    if name in ("org.bluez.Error.NotReady", "org.bluez.Error.Blocked"):
        return powered_off(adapter, f"{text or name} while {doing}")
    if slot is not None and name.startswith("org.bluez.Error."):
        hint = _REFUSED_HINTS.get(name, "journalctl -u bluetooth says why")
        return BeaconError(slot, f"BlueZ refused it while {doing}: {text or name}; {hint}")
    return HardwareUnavailable(KIND, f"{doing} failed: {name}: {text}")


def _no_answer(doing: str) -> HardwareUnavailable:
    return HardwareUnavailable(KIND, f"bluetoothd did not answer while {doing}: is it hung? "
                                     "systemctl restart bluetooth")


def adapter_missing(adapter: str, adapters: Sequence[str]) -> HardwareUnavailable:
    known = ", ".join(adapters) if adapters else "none"
    return HardwareUnavailable(KIND, f"adapter {adapter} not found; adapters: {known} "
                                     "(set beacon.adapter, or plug the adapter in)")


def no_advertising(adapter: str) -> HardwareUnavailable:
    return HardwareUnavailable(KIND, f"adapter {adapter} cannot advertise: BlueZ offers no "
                                     "LEAdvertisingManager1 on it (not an LE adapter, or "
                                     "bluetoothd too old: BlueZ >= 5.48 needed)")


def powered_off(adapter: str, why: str) -> HardwareUnavailable:
    return HardwareUnavailable(KIND, f"adapter {adapter} is powered off and could not be "
                                     f"powered on ({why}): rfkill unblock bluetooth; "
                                     f"bluetoothctl power on")


@contextlib.contextmanager
def translated(*, adapter: str, doing: str, slot: str | None = None,
               bus: str | None = None) -> Iterator[None]:
    """Run the block with every D-Bus failure raised as its tapgate error."""
    try:
        yield
    except TapgateError:
        raise
    except (DBusFastError, OSError, EOFError, TimeoutError) as err:
        raise translate(err, adapter=adapter, doing=doing, slot=slot, bus=bus) from err
