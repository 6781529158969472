"""Shared fixtures; real components (pcscd + vpcd, mosquitto, dbus-daemon) live in
tests/fixtures/ and are started by the suite itself. The fixtures that several modules
of one part share (the head-end's, the uplink's, the AsyncAPI document's) live in
tests/*_support.py, and the real daemon's in tests/daemon_process.py, registered here as
plugins."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.disk import TinyDisk, tiny_disk
from tests.rig import Rig

pytest_plugins = ["tests.fixtures.pcsc", "tests.fixtures.mosquitto", "tests.fixtures.bluez",
                  "tests.headend_support", "tests.uplink_support", "tests.asyncapi_support",
                  "tests.daemon_process", "tests.command_support"]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """One gate on the simulator with a journal in tmp_path (tests.rig.Rig)."""
    rig = Rig(tmp_path)
    yield rig
    rig.close()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[TinyDisk]:
    """A 1 MiB tmpfs the test can fill to the last byte (needs root to mount)."""
    with tiny_disk(tmp_path / "disk") as mounted:
        if mounted is None:
            pytest.skip("mounting a tmpfs needs root")
        yield mounted
