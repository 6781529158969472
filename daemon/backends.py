"""The gate's hardware, built from config: each backend is chosen by name through
:mod:`hal.registry` (imported only when chosen) and handed only what its own config
section holds for it, as keyword arguments (never the config itself)."""

from __future__ import annotations

from collections.abc import Callable

from daemon.beacon.config import BeaconConfig
from daemon.config import GateIOConfig, ReaderConfig, SamConfig
from hal import registry
from hal.ble.base import Advertiser
from hal.gate.base import GateIO
from hal.reader.base import Reader
from hal.sam.base import Sam


def reader(section: ReaderConfig) -> Reader:
    """[reader]: ``name`` and ``poll_s`` are the PC/SC reader's. The ``sim_*`` keys are
    the demo passengers' (:mod:`daemon.demo`), not the sim reader's."""
    match section.backend:
        case "pcsc":
            return registry.reader("pcsc")(name=section.name, poll_s=section.poll_s)
        case "sim":
            return registry.reader("sim")()
    raise registry.unknown("reader", section.backend)


def sam(section: SamConfig) -> Sam:
    match section.backend:
        case "software":
            return registry.sam("software")(purchase_key=section.purchase_key,
                                            key_file=section.key_file)
    raise registry.unknown("sam", section.backend)


def gateio(section: GateIOConfig, *, on_button: Callable[[], object] | None = None) -> GateIO:
    """``on_button``: what the gate's service button does (called from the driver's
    thread)."""
    match section.backend:
        case "sim":
            return registry.gateio("sim")(hang_after=section.sim_hang_after,
                                          on_button=on_button)
    raise registry.unknown("gateio", section.backend)


def advertiser(section: BeaconConfig) -> Advertiser:
    match section.backend:
        case "bluez":
            return registry.advertiser("bluez")(adapter=section.adapter)
        case "sim":
            return registry.advertiser("sim")()
    raise registry.unknown("ble", section.backend)
