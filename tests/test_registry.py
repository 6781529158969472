"""The backend registry: one function per kind of hardware, each backend imported only when
chosen; a missing driver fails that backend alone, naming the package to install."""

from __future__ import annotations

import sys

import pytest

from daemon import backends
from daemon.config import ReaderConfig, SamConfig
from hal import registry
from hal.gate.sim import SimGateIO
from hal.reader.sim import SimReader
from hal.sam.software import SoftwareSam
from protocol.errors import BackendMissing, ConfigError
from tests.cards import MASTER_KEY


def test_each_kind_names_its_backends() -> None:
    assert registry.reader("sim") is SimReader
    assert registry.sam("software") is SoftwareSam
    assert registry.gateio("sim") is SimGateIO


def test_an_unknown_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown backend; known: pcsc, sim"):
        registry.reader("nfc")
    with pytest.raises(ConfigError, match=r"config reader.backend = 'nfc'"):
        backends.reader(ReaderConfig(backend="nfc"))


def test_a_missing_driver_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "hal.reader.pcsc", raising=False)
    monkeypatch.setitem(sys.modules, "smartcard", None)  # pyscard not installed
    with pytest.raises(BackendMissing) as caught:
        registry.reader("pcsc")
    assert (caught.value.kind, caught.value.backend, caught.value.package) == (
        "reader", "pcsc", "pyscard")
    assert "needs the package 'pyscard': install it" in str(caught.value)
    assert registry.reader("sim") is SimReader  # the other backends keep working


def test_backends_get_their_own_arguments() -> None:
    sim = backends.reader(ReaderConfig(backend="sim", name="ACS*", poll_s=1.0))
    assert isinstance(sim, SimReader) and sim.name == "sim"
    sam = backends.sam(SamConfig(purchase_key=MASTER_KEY))
    assert isinstance(sam, SoftwareSam)
