"""The files a config names: `tapgate config check` and `tapgate run` agree on them.

A path with a NUL, a journal that is /dev/null or a directory, a key file missing or
readable by others, a metrics directory that is not there: `config check` refuses each
with the key, the value and why (exit 2), and `run` refuses it the same way, before it
starts anything, with the same one line and no traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.config import validate
from daemon.configfiles import check_files
from protocol.errors import ConfigError
from tests.configs import raw_config
from tests.operator_cli_support import tapgate, write_config

KEY_HEX = "000102030405060708090A0B0C0D0E0F"


def _key_file(path: Path, mode: int) -> str:
    path.write_text(KEY_HEX + "\n", encoding="ascii")
    path.chmod(mode)
    return str(path)


def _with(raw: dict[str, dict[str, Any]], dotted: str, value: Any) -> dict[str, dict[str, Any]]:
    section, _, key = dotted.partition(".")
    raw.setdefault(section, {})[key] = value
    if dotted == "sam.key_file":
        del raw["sam"]["purchase_key"]
    return raw


@pytest.mark.parametrize("dotted", ["journal.path", "sam.key_file", "journal.device_key",
                                    "metrics.textfile_dir", "mqtt.tls_ca", "beacon.eid_key_file"])
def test_a_nul_in_any_path_is_refused_at_validation(tmp_path: Path, dotted: str) -> None:
    raw = _with(raw_config(tmp_path / "journal.db"), dotted, f"{tmp_path}/a\0b")
    if dotted == "mqtt.tls_ca":
        raw["mqtt"]["host"] = "broker.example"
    with pytest.raises(ConfigError) as caught:
        validate(raw)
    assert caught.value.key == dotted and "NUL" in caught.value.why


def _cases(tmp_path: Path) -> dict[str, tuple[str, Any, str]]:
    """case -> (key, value, what the refusal says)."""
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    return {
        "nul": ("journal.path", f"{tmp_path}/journal\0.db", "must not hold a NUL"),
        "dev-null": ("journal.path", "/dev/null", "is not a regular file (a character device)"),
        "directory": ("journal.path", str(tmp_path), "is not a regular file (a directory)"),
        "under-a-file": ("journal.path", str(_key_file(tmp_path / "f", 0o600)) + "/journal.db",
                         "cannot be looked at: Not a directory"),
        "missing-key": ("sam.key_file", str(tmp_path / "nope.key"), "cannot be read"),
        "open-key": ("sam.key_file", _key_file(open_dir / "purchase.key", 0o644),
                     "is readable by others (mode 0644)"),
        "missing-device-key": ("journal.device_key", str(tmp_path / "device.key"),
                               "cannot be read"),
        "missing-metrics-dir": ("metrics.textfile_dir", str(tmp_path / "textfiles"),
                                "no such directory"),
        "metrics-dir-a-file": ("metrics.textfile_dir", str(tmp_path / "f"),
                               "is not a directory (a regular file)"),
    }


CASES = ["nul", "dev-null", "directory", "under-a-file", "missing-key", "open-key",
         "missing-device-key", "missing-metrics-dir", "metrics-dir-a-file"]


@pytest.mark.parametrize("case", CASES)
def test_config_check_and_run_refuse_the_same_file_the_same_way(tmp_path: Path,
                                                               case: str) -> None:
    key, value, why = _cases(tmp_path)[case]
    raw = _with(raw_config(tmp_path / "journal.db"), key, value)
    config = write_config(tmp_path / "tapgate.toml", raw)
    # TOML has a NUL only escaped
    config.write_text(config.read_text(encoding="utf-8").replace("\0", "\\u0000"),
                      encoding="utf-8")
    check = tapgate("config", "check", str(config))
    run = tapgate("run", "--config", str(config))
    for done in (check, run):
        assert done.returncode == 2, (done.args, done.stderr)
        assert done.stderr.startswith(f"tapgate: config {key} = "), done.stderr
        assert why in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert check.stderr == run.stderr.splitlines(keepends=True)[-1]
    assert check.stdout == ""


def test_config_check_accepts_what_run_can_use(tmp_path: Path) -> None:
    """Files that are there, private and of the right kind pass; a journal not there
    yet passes if its directory can be made."""
    (tmp_path / "textfiles").mkdir()
    raw = raw_config(tmp_path / "var" / "lib" / "journal.db")
    del raw["sam"]["purchase_key"]
    raw["sam"]["key_file"] = _key_file(tmp_path / "purchase.key", 0o600)
    raw["metrics"] = {"textfile_dir": str(tmp_path / "textfiles")}
    check_files(validate(raw))
    done = tapgate("config", "check", str(write_config(tmp_path / "tapgate.toml", raw)))
    assert done.returncode == 0, done.stderr


def test_config_check_no_files_looks_at_values_only(tmp_path: Path) -> None:
    raw = _with(raw_config(tmp_path / "journal.db"), "sam.key_file", str(tmp_path / "nope"))
    config = write_config(tmp_path / "tapgate.toml", raw)
    assert tapgate("config", "check", str(config)).returncode == 2
    done = tapgate("config", "check", "--no-files", str(config))
    assert done.returncode == 0, done.stderr
