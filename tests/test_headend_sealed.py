"""The gates' EID identity keys at rest in the head-end's database: sealed (AES-GCM, the
gate id as associated data) with a database key kept outside it; rows written in plain
hex by an older head-end still resolve, and are sealed once the key is given."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from headend import sealed
from headend.beacons import BeaconDirectory, NoDatabaseKey
from headend.sealed import Sealer, SealError
from protocol.beacon import frames
from protocol.beacon.eid import EidSchedule
from protocol.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
GATE, OTHER = "0000000000A7", "0000000000B2"
KEY = bytes(range(100, 116))
K, NOW = 10, 1_700_000_000.0
DB_KEY = Sealer(bytes(32))


def heard(key: bytes = KEY) -> bytes:
    return frames.eddystone_eid(EidSchedule(key, K, 0).eid_at(NOW), -20).payload()


def table(db: Path) -> list[tuple[object, ...]]:
    con = sqlite3.connect(db)
    try:
        return list(con.execute("SELECT * FROM beacon_eid ORDER BY gate"))
    finally:
        con.close()


def test_registered_keys_are_sealed_and_open_only_with_the_database_key(
        tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    with BeaconDirectory(f"sqlite:///{db}", sealer=DB_KEY) as d:
        d.register_eid(GATE, KEY, K, 0)
        assert d.resolve(heard(), NOW).gate == GATE  # type: ignore[union-attr]
    rows = table(db)
    assert len(rows) == 1 and KEY.hex() not in repr(rows).lower()
    assert KEY.hex() not in db.read_bytes().hex() and KEY not in db.read_bytes()
    with BeaconDirectory(f"sqlite:///{db}") as d:  # no key: no EID resolves
        with pytest.raises(NoDatabaseKey, match="--db-key-file"):
            d.resolve(heard(), NOW)
        with pytest.raises(NoDatabaseKey):
            d.register_eid(OTHER, KEY, K, 0)
    another = Sealer(bytes(31) + b"\1")
    with BeaconDirectory(f"sqlite:///{db}", sealer=another) as d, pytest.raises(
            SealError, match="does not open"):
        d.resolve(heard(), NOW)
    # a sealed key moved to another gate's row does not open there
    con = sqlite3.connect(db)
    con.execute("INSERT INTO beacon_eid SELECT ?, identity_key, sealed_key, exponent, epoch, "
                "registered_ms FROM beacon_eid WHERE gate = ?", (OTHER, GATE))
    con.execute("DELETE FROM beacon_eid WHERE gate = ?", (GATE,))
    con.commit()
    con.close()
    with BeaconDirectory(f"sqlite:///{db}", sealer=DB_KEY) as d, pytest.raises(SealError):
        d.resolve(heard(), NOW)


def test_plain_keys_of_an_older_head_end_are_sealed_once_the_key_is_given(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "h.db"
    con = sqlite3.connect(db)  # beacon_eid as head-ends before sealing made it
    con.execute('CREATE TABLE "beacon_eid" ("gate" VARCHAR(64) NOT NULL PRIMARY KEY, '
                '"identity_key" VARCHAR(32) NOT NULL, "exponent" INTEGER NOT NULL, '
                '"epoch" INTEGER NOT NULL, "registered_ms" INTEGER NOT NULL)')
    con.execute("INSERT INTO beacon_eid VALUES (?, ?, ?, 0, 1)", (GATE, KEY.hex(), K))
    con.commit()
    con.close()
    with BeaconDirectory(f"sqlite:///{db}") as d:  # still resolves; says what to do
        assert d.resolve(heard(), NOW).gate == GATE  # type: ignore[union-attr]
    assert "1 EID identity keys are in plain hex" in caplog.text
    assert KEY.hex() in repr(table(db))
    with BeaconDirectory(f"sqlite:///{db}", sealer=DB_KEY) as d:
        assert d.resolve(heard(), NOW).gate == GATE  # type: ignore[union-attr]
    assert KEY.hex() not in repr(table(db)).lower()
    with BeaconDirectory(f"sqlite:///{db}", sealer=DB_KEY) as d:
        assert d.resolve(heard(), NOW).gate == GATE  # type: ignore[union-attr]


def test_the_database_key_file(tmp_path: Path) -> None:
    path = tmp_path / "db.key"
    done = subprocess.run([sys.executable, "-m", "headend.cli", "db-keygen", "--out", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    sealer = sealed.load(path)
    assert sealer.open(GATE, sealer.seal(GATE, KEY)) == KEY
    with pytest.raises(ConfigError, match="exists"):
        sealed.generate(path)
    path.chmod(0o644)  # readable by others: a key to replace, not to use
    with pytest.raises(ConfigError, match="chmod 600"):
        sealed.load(path)
    path.chmod(0o600)
    path.write_text("not hex\n")
    with pytest.raises(ConfigError, match="64 hex digits"):
        sealed.load(path)
