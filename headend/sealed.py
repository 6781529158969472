"""Secrets the head-end keeps in its database (the gates' EID identity keys), encrypted
at rest with a key that is not in the database: a copy of the database, a backup or a
dump alone gives none of them away.

The key is 32 random bytes (AES-256-GCM) in a file of its own, 64 hex digits, mode 0600
(``tapgate-headend db-keygen --out FILE``), given as ``--db-key-file`` or in the
environment as ``TAPGATE_HEADEND_DB_KEY_FILE``. Each secret is sealed with a fresh
96-bit nonce and its gate id as associated data, so a sealed key moved to another gate's
row does not open.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from headend import keys
from protocol.errors import ConfigError, TapgateError

KEY_BYTES = 32
NONCE_BYTES = 12
PREFIX = "v1:"  # the format of a sealed value: "v1:" + hex(nonce || ciphertext || tag)
ENV = "TAPGATE_HEADEND_DB_KEY_FILE"
OPTION = "--db-key-file"


class SealError(TapgateError):
    """A sealed secret that this key does not open (another key, or altered)."""


class Sealer:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a database key is {KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(key)

    def seal(self, gate: str, secret: bytes) -> str:
        nonce = os.urandom(NONCE_BYTES)
        return PREFIX + (nonce + self._aead.encrypt(nonce, secret, gate.encode())).hex()

    def open(self, gate: str, sealed: str) -> bytes:
        try:
            if not sealed.startswith(PREFIX):
                raise ValueError("not a sealed value")
            raw = bytes.fromhex(sealed[len(PREFIX):])
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], gate.encode())
        except (ValueError, InvalidTag) as err:
            raise SealError(f"the sealed secret of {gate} does not open with this database "
                            "key (another key file, or the row was altered)") from err


def load(path: Path) -> Sealer:
    """The database key file: 64 hex digits (whitespace around them ignored), mode 0600."""
    data = keys.read_secret(OPTION, path)
    try:
        return Sealer(bytes.fromhex(data.decode("ascii").strip()))
    except (UnicodeDecodeError, ValueError) as err:
        raise ConfigError(OPTION, str(path), f"is not {2 * KEY_BYTES} hex digits") from err


def from_option(path: Path | None) -> Sealer | None:
    """The key file given, else the environment's, else None."""
    if path is None and os.environ.get(ENV):
        path = Path(os.environ[ENV])
    return load(path) if path is not None else None


def generate(path: Path, *, force: bool = False) -> None:
    """A new database key file, mode 0600 from the start, never over an existing file
    unless ``force``."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as err:
        raise ConfigError("--out", str(path), "exists; pass --force to replace it") from err
    except OSError as err:
        raise ConfigError("--out", str(path), f"cannot be written: {err.strerror}") from err
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(secrets.token_bytes(KEY_BYTES).hex().upper() + "\n")
