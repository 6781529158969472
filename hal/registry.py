"""Backends by name: config names a backend, the registry imports only that one.

A backend whose driver is missing fails alone, with one error that names the package to
install; the others keep working (the python-can way).
"""

from __future__ import annotations

import importlib
from typing import Any

from protocol.errors import BackendMissing, ConfigError

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


def backend_class(kind: str, name: str) -> Any:
    """The class registered for ``kind``/``name``, imported now."""
    try:
        target, package = BACKENDS[kind][name]
    except KeyError as err:
        known = ", ".join(sorted(BACKENDS.get(kind, {})))
        raise ConfigError(f"{kind}.backend", name, f"unknown backend; known: {known}") from err
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackendMissing(kind, name, package) from err
    return getattr(module, class_name)
