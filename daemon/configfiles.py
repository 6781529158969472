"""The files a valid config names, looked at as `run` needs them: one check, used by
`tapgate config check` and by `tapgate run` before anything starts, so that the two
agree (a config that passes the check does not then stop `run` on a file).

Each problem is a :class:`ConfigError` naming the key, the path and why. Key files are
read with the very functions `run` reads them with (the SAM's, the device key's).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from daemon.config import Config
from hal.sam.software import read_key_file
from protocol import devicekey
from protocol.errors import ConfigError


def check_files(config: Config) -> None:
    """Refuse the config if a file it names would stop `run` (see the module)."""
    if config.sam.key_file is not None:
        read_key_file(config.sam.key_file)
    if config.journal.device_key is not None:
        devicekey.load(config.journal.device_key)
    _journal("journal.path", config.journal.path)
    if config.metrics.textfile_dir is not None:
        _directory("metrics.textfile_dir", config.metrics.textfile_dir)
    for key, path in (("mqtt.tls_ca", config.mqtt.tls_ca), ("mqtt.tls_cert", config.mqtt.tls_cert),
                      ("mqtt.tls_key", config.mqtt.tls_key)):
        if path is not None and config.mqtt.enabled:
            _readable(key, path)


def _stat(key: str, path: Path) -> os.stat_result | None:
    """The file's stat; None: there is none."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except OSError as err:  # a name too long, a loop of links, no permission on the way
        raise ConfigError(key, str(path), f"cannot be looked at: {err.strerror}") from err


def _journal(key: str, path: Path) -> None:
    """An SQLite file the daemon reads and writes, or none yet in a directory it can
    create it in (the journal's parent is made at open): never a directory, a device
    (/dev/null takes every write and keeps none) or a pipe."""
    found = _stat(key, path)
    if found is None:
        _creatable(key, path)
        return
    if not stat.S_ISREG(found.st_mode):
        raise ConfigError(key, str(path), f"is not a regular file ({_kind(found.st_mode)})")
    if not os.access(path, os.R_OK | os.W_OK):
        raise ConfigError(key, str(path), "cannot be read and written by this user")
    # SQLite keeps its WAL and lock files beside the journal
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(key, str(path), f"its directory {path.parent} is not writable")


def _creatable(key: str, path: Path) -> None:
    """A file that does not exist yet: its nearest existing ancestor is a directory
    this user can write in (the rest of the way is made at open)."""
    parent = path.absolute().parent
    while True:
        found = _stat(key, parent)
        if found is not None:
            break
        parent = parent.parent
    if not stat.S_ISDIR(found.st_mode):
        raise ConfigError(key, str(path), f"{parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(key, str(path), f"cannot be created: {parent} is not writable")


def _directory(key: str, path: Path) -> None:
    found = _stat(key, path)
    if found is None:
        raise ConfigError(key, str(path), "no such directory")
    if not stat.S_ISDIR(found.st_mode):
        raise ConfigError(key, str(path), f"is not a directory ({_kind(found.st_mode)})")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(key, str(path), "is not writable by this user")


def _readable(key: str, path: Path) -> None:
    found = _stat(key, path)
    if found is None:
        raise ConfigError(key, str(path), "no such file")
    if not stat.S_ISREG(found.st_mode):
        raise ConfigError(key, str(path), f"is not a regular file ({_kind(found.st_mode)})")
    if not os.access(path, os.R_OK):
        raise ConfigError(key, str(path), "cannot be read by this user")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "of an unknown kind"
