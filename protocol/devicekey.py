"""The gate's Ed25519 device key: every journal entry is signed with it, so the back
office can prove which gate wrote what.

Stored as PEM (PKCS#8, unencrypted: the gate starts unattended), mode 0600, created
with O_EXCL so an existing key is never overwritten by accident.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import ConfigError


def generate(path: Path, *, force: bool = False) -> Ed25519PrivateKey:
    """Write a new key to ``path`` (0600, parent created 0700 if missing)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def load(path: Path) -> Ed25519PrivateKey:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError("journal.device_key", str(path),
                          f"cannot be read: {err.strerror}; create it with `tapgate keygen`"
                          ) from err
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError("journal.device_key", str(path),
                          f"is readable by others (mode {stat.S_IMODE(mode):04o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError("journal.device_key", str(path), "is not a PEM private key") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("journal.device_key", str(path), "is not an Ed25519 key")
    return key


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex().upper()
