"""The head-end's key files: the back office's TAC master key, the gates' device public
keys, and the operators' Ed25519 command keys.

Secret files (the TAC master key, an operator key) are refused when group or others may
read them, as the gate refuses its SAM and device keys: a key that leaked through a
permission is a key to rotate, not one to use.
"""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol import devicekey
from protocol.errors import ConfigError

TAC_KEY_BYTES = 16
KEY_ID_BYTES = 8


def read_secret(option: str, path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(option, str(path), f"cannot be read: {err.strerror}") from err
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(option, str(path),
                          f"is readable by group or others (mode {stat.S_IMODE(mode):04o}); "
                          "chmod 600 it")
    return data


def load_tac_master_key(path: Path) -> bytes:
    """K_master_tac: 32 hex digits (surrounding whitespace ignored), mode 0600."""
    data = read_secret("--tac-key-file", path)
    try:
        key = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as err:
        raise ConfigError("--tac-key-file", str(path),
                          "is not 32 hex digits") from err
    if len(key) != TAC_KEY_BYTES:
        raise ConfigError("--tac-key-file", str(path),
                          f"holds {len(key)} bytes; an AES-128 key is {TAC_KEY_BYTES}")
    return key


def public_from_hex(text: str) -> Ed25519PublicKey:
    raw = bytes.fromhex(text)
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_gate_keys(path: Path) -> dict[str, list[Ed25519PublicKey]]:
    """Gate id -> its device public keys (hex). TOML or JSON, one entry per gate:

        000000A00001 = "3B6A27BC..."                 # one key
        000000A00002 = ["OLD...", "NEW..."]          # during a rotation: any of them

    A gate id is matched exactly as it appears in the gate's topic.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError("--gate-keys", str(path), f"cannot be read: {err.strerror}") from err
    try:
        table = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise ConfigError("--gate-keys", str(path), f"is neither TOML nor JSON: {err}") from err
    if not isinstance(table, dict):
        raise ConfigError("--gate-keys", str(path), "is not a table of gate id -> key")
    keys: dict[str, list[Ed25519PublicKey]] = {}
    for gate, value in table.items():
        texts = value if isinstance(value, list) else [value]
        try:
            keys[str(gate)] = [public_from_hex(str(t)) for t in texts]
        except ValueError as err:
            raise ConfigError(f"--gate-keys {gate}", str(value),
                              f"is not an Ed25519 public key in hex: {err}") from err
    return keys


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """An operator key's id: the first 8 bytes of its public key, in uppercase hex."""
    return public_raw(key)[:KEY_ID_BYTES].hex().upper()


def public_raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_operator_key(path: Path, *, force: bool = False) -> Ed25519PrivateKey:
    """A new operator key as PKCS#8 PEM, mode 0600, never over an existing file unless
    ``force`` (written the way a gate writes its device key)."""
    try:
        return devicekey.generate(path, force=force)
    except FileExistsError as err:
        raise ConfigError("--out", str(path), "exists; pass --force to replace it") from err


def load_operator_key(path: Path) -> Ed25519PrivateKey:
    data = read_secret("--key-file", path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError("--key-file", str(path), "is not an unencrypted PEM private key"
                          ) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("--key-file", str(path), "is not an Ed25519 key")
    return key
