"""A SAM in software: the purchase master key held in the daemon's memory.

The key comes from config or from a key file; a key file that group or others can read
is refused, as ssh refuses such a private key.
"""

from __future__ import annotations

import functools
import hmac
import stat
from pathlib import Path

from protocol.errors import ConfigError
from protocol.tgp1.crypto import Purchase, card_key


def read_key_file(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii").strip()
    except OSError as err:
        raise ConfigError("sam.key_file", str(path), f"cannot be read: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError("sam.key_file", str(path), "must hold 32 hex digits") from err
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError("sam.key_file", str(path),
                          f"is readable by others (mode {stat.S_IMODE(mode):04o}); chmod 600 it")
    try:
        key = bytes.fromhex(text)
    except ValueError as err:
        raise ConfigError("sam.key_file", str(path), "must hold 32 hex digits") from err
    if len(key) != 16:
        raise ConfigError("sam.key_file", str(path), "must hold 32 hex digits (AES-128)")
    return key


class SoftwareSam:
    def __init__(self, *, purchase_key: bytes | None = None,
                 key_file: Path | None = None) -> None:
        """The key itself, or the file that holds it (``sam.purchase_key`` or
        ``sam.key_file``): exactly one of them."""
        if key_file is not None:
            if purchase_key is not None:
                raise ValueError("give purchase_key or key_file, not both")
            purchase_key = read_key_file(key_file)
        if purchase_key is None:
            raise ValueError("give purchase_key or key_file")
        if len(purchase_key) != 16:
            raise ValueError("purchase key must be 16 bytes")
        self._master = purchase_key
        # Card keys are re-derived per serial; a gate sees the same cards again and again.
        self._card_key = functools.lru_cache(maxsize=4096)(self._derive)
        # The session key of the last purchase MAC1 was computed for: checking its MAC2
        # (a moment later, before the gate opens) needs the same key, not a new CMAC.
        self._session: tuple[bytes, Purchase, bytes] | None = None

    def _derive(self, serial: bytes) -> bytes:
        return card_key(self._master, serial)

    def _session_key(self, serial: bytes, purchase: Purchase) -> bytes:
        session = self._session
        if session is not None and session[0] == serial and session[1] == purchase:
            return session[2]
        key = purchase.session_key(self._card_key(serial))
        self._session = (serial, purchase, key)
        return key

    def mac1(self, serial: bytes, purchase: Purchase) -> bytes:
        return purchase.mac1(self._session_key(serial, purchase))

    def check_mac2(self, serial: bytes, purchase: Purchase, mac2: bytes) -> bool:
        expected = purchase.mac2(self._session_key(serial, purchase))
        return hmac.compare_digest(expected, mac2)

    def close(self) -> None:
        self._session = None
        self._card_key.cache_clear()
