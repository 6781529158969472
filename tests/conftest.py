"""Shared fixtures; real components (pcscd + vpcd, mosquitto, dbus-daemon) live in
tests/fixtures/ and are started by the suite itself."""

pytest_plugins = ["tests.fixtures.pcsc", "tests.fixtures.mosquitto"]
