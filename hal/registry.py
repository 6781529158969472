"""Backends by name: config names a backend, the registry imports only that one.

A backend whose driver is missing fails alone, with one error that names the package to
install; the others keep working (the python-can way).

One function per kind of hardware, typed by it: ``reader("pcsc")`` is the
:class:`~hal.reader.pcsc.PcscReader` class, ``reader(name)`` for any other name a
``type[Reader]``. The caller builds the backend from its own keyword arguments, and mypy
checks them against the backend's constructor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Literal, overload

from protocol.errors import BackendMissing, ConfigError

if TYPE_CHECKING:
    from hal.ble.base import Advertiser
    from hal.ble.bluez import BluezAdvertiser
    from hal.ble.sim import SimAdvertiser
    from hal.gate.base import GateIO
    from hal.gate.sim import SimGateIO
    from hal.reader.base import Reader
    from hal.reader.pcsc import PcscReader
    from hal.reader.sim import SimReader
    from hal.sam.base import Sam
    from hal.sam.software import SoftwareSam

# kind -> backend name -> ("module:Class", the PyPI package its driver comes from)
BACKENDS: dict[str, dict[str, tuple[str, str]]] = {
    "reader": {
        "sim": ("hal.reader.sim:SimReader", "tapgate"),
        "pcsc": ("hal.reader.pcsc:PcscReader", "pyscard"),
    },
    "sam": {
        "software": ("hal.sam.software:SoftwareSam", "cryptography"),
    },
    "gateio": {
        "sim": ("hal.gate.sim:SimGateIO", "tapgate"),
    },
    "ble": {
        "sim": ("hal.ble.sim:SimAdvertiser", "tapgate"),
        "bluez": ("hal.ble.bluez:BluezAdvertiser", "dbus-fast"),
    },
}


def unknown(kind: str, name: str) -> ConfigError:
    """The error for a backend name the registry does not know."""
    known = ", ".join(sorted(BACKENDS.get(kind, {})))
    return ConfigError(f"{kind}.backend", name, f"unknown backend; known: {known}")


def _load(kind: str, name: str) -> Any:
    """The class registered for ``kind``/``name``, imported now (typed by the callers)."""
    try:
        target, package = BACKENDS[kind][name]
    except KeyError as err:
        raise unknown(kind, name) from err
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackendMissing(kind, name, package) from err
    return getattr(module, class_name)


@overload
def reader(name: Literal["sim"]) -> type[SimReader]: ...
@overload
def reader(name: Literal["pcsc"]) -> type[PcscReader]: ...
@overload
def reader(name: str) -> type[Reader]: ...
def reader(name: str) -> type[Reader]:
    cls: type[Reader] = _load("reader", name)
    return cls


@overload
def sam(name: Literal["software"]) -> type[SoftwareSam]: ...
@overload
def sam(name: str) -> type[Sam]: ...
def sam(name: str) -> type[Sam]:
    cls: type[Sam] = _load("sam", name)
    return cls


@overload
def gateio(name: Literal["sim"]) -> type[SimGateIO]: ...
@overload
def gateio(name: str) -> type[GateIO]: ...
def gateio(name: str) -> type[GateIO]:
    cls: type[GateIO] = _load("gateio", name)
    return cls


@overload
def advertiser(name: Literal["sim"]) -> type[SimAdvertiser]: ...
@overload
def advertiser(name: Literal["bluez"]) -> type[BluezAdvertiser]: ...
@overload
def advertiser(name: str) -> type[Advertiser]: ...
def advertiser(name: str) -> type[Advertiser]:
    cls: type[Advertiser] = _load("ble", name)
    return cls
