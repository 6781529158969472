"""Eddystone-EID matches published vectors and a second, straight-from-the-spec
implementation; it rotates exactly on period boundaries, and the head-end resolves it
within the allowed drift and not beyond."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from protocol.beacon.eid import EidSchedule, compute_eid, resolve, rotation_period_s, temporary_key
from protocol.beacon.frames import FrameError

# (identity key, K, counter, temporary key or None, EID), all hex
VECTORS = [
    # RadiusNetworks/ephemeral_calc spec/encryptor_spec.rb: key 0102...16, scaler 10, EID at
    # beacon time 0 (Encryptor created "now"), and at beacon time ~2000 (created now - 2000 s,
    # so any counter of the quantum 1024..2047; 2000 here)
    ("0102030405060708090A111213141516", 10, 0, None, "A9B76A71C5F89290"),
    ("0102030405060708090A111213141516", 10, 2000, None, "4144413E45FEFA58"),
    # the EID test of a fork of sandeepmistry/node-eddystone-beacon-scanner (with the key
    # built into its scanner, 0011...FF): temporary key and EID at counter 1518080946, K=12
    ("00112233445566778899AABBCCDDEEFF", 12, 1518080946, "B7C2D909D27D22DF8343271162480210",
     "7DD8169DAE94258C"),
    # the identity key derived in the resolver test of a Python port of eidtools
    # (ephemeral_id_python) and of a Rust port, both expecting this EID at K=0, counter 0
    ("7C91330E61DFEA4606B5B3ECB4457D76", 0, 0, None, "436BFE57D5A09505"),
]


def reference_eid(key: bytes, k: int, counter: int) -> tuple[bytes, bytes]:
    """eid-computation.md written out again, sharing no code with protocol.beacon.eid: the
    16-byte blocks packed field by field, one AES-128 cipher object per encryption."""
    def aes(aes_key: bytes, block: bytes) -> bytes:
        assert len(block) == 16
        enc = Cipher(algorithms.AES128(aes_key), modes.ECB()).encryptor()
        return enc.update(block) + enc.finalize()

    # offsets 0-10 padding, 11 salt 0xFF, 12-13 padding, 14-15 counter bits 31..16
    tk_block = struct.pack(">11sB2sH", b"\x00" * 11, 0xFF, b"\x00\x00", (counter >> 16) & 0xFFFF)
    tk = aes(key, tk_block)
    # offsets 0-10 padding, 11 K, 12-15 counter with its K lowest bits cleared
    masked = counter & ~((1 << k) - 1) & 0xFFFFFFFF
    eid_block = struct.pack(">11sBI", b"\x00" * 11, k, masked)
    return tk, aes(tk, eid_block)[:8]


@pytest.mark.parametrize("key,k,counter,tk,expected", VECTORS)
def test_published_vectors(key: str, k: int, counter: int, tk: str | None,
                           expected: str) -> None:
    identity = bytes.fromhex(key)
    assert compute_eid(identity, k, counter).hex().upper() == expected
    assert reference_eid(identity, k, counter)[1].hex().upper() == expected
    if tk is not None:
        assert temporary_key(identity, counter).hex().upper() == tk


keys = st.binary(min_size=16, max_size=16)
exponents = st.integers(0, 15)
counters = st.integers(0, 2**32 - 1)


@given(keys, exponents, counters)
def test_matches_reference(key: bytes, k: int, counter: int) -> None:
    tk, expected = reference_eid(key, k, counter)
    assert temporary_key(key, counter) == tk
    assert compute_eid(key, k, counter) == expected


@given(keys, exponents, st.integers(0, 2**31), st.integers(1_500_000_000, 1_900_000_000))
def test_schedule_rotates_exactly_on_boundaries(key: bytes, k: int, quantum_start: int,
                                                epoch: int) -> None:
    period = 1 << k
    start = quantum_start - quantum_start % period
    schedule = EidSchedule(identity_key=key, exponent=k, epoch=epoch)
    at = epoch + start
    assert schedule.counter(at) == start
    assert schedule.eid_at(at) == compute_eid(key, k, start)
    # same EID through the whole period, fractions of a second included
    assert schedule.eid_at(at + period - 1 + 0.999) == schedule.eid_at(at)
    assert schedule.eid_at(at + 0.5) == schedule.eid_at(at)
    # and a different one on both sides of it
    assert schedule.eid_at(at - 0.001) != schedule.eid_at(at)
    assert schedule.eid_at(at + period) != schedule.eid_at(at)
    assert schedule.next_rotation(at) == at + period
    assert schedule.next_rotation(at - 0.001) == at
    assert schedule.next_rotation(at + period - 0.5) == at + period


def test_rotation_period_and_bad_inputs() -> None:
    assert [rotation_period_s(k) for k in (0, 1, 10, 15)] == [1, 2, 1024, 32768]
    for k in (-1, 16, 31):
        with pytest.raises(FrameError, match="exponent"):
            rotation_period_s(k)
        with pytest.raises(FrameError):
            compute_eid(bytes(16), k, 0)
        with pytest.raises(FrameError):
            EidSchedule(identity_key=bytes(16), exponent=k, epoch=0)
    for size in (0, 15, 17, 32):
        with pytest.raises(FrameError, match="16 bytes"):
            temporary_key(bytes(size), 0)
        with pytest.raises(FrameError, match="16 bytes"):
            compute_eid(bytes(size), 10, 0)
        with pytest.raises(FrameError, match="16 bytes"):
            EidSchedule(identity_key=bytes(size), exponent=10, epoch=0)
    for counter in (-1, 2**32):
        with pytest.raises(FrameError, match="32-bit"):
            compute_eid(bytes(16), 10, counter)


def test_key_stays_out_of_repr() -> None:
    key = bytes.fromhex("0102030405060708090A111213141516")
    text = repr(EidSchedule(identity_key=key, exponent=10, epoch=0))
    assert "identity_key" not in text and key.hex() not in text and str(key) not in text


def test_counter_is_32_bits_and_wraps() -> None:
    schedule = EidSchedule(identity_key=bytes(16), exponent=4, epoch=1_700_000_000)
    assert schedule.counter(1_700_000_000 + 2**32 + 3.7) == 3
    assert schedule.eid_at(1_700_000_000 + 2**32) == schedule.eid_at(1_700_000_000)


EPOCH = 1_700_000_000
GATES = {
    f"gate-{n}": EidSchedule(identity_key=bytes([n]) * 16, exponent=k, epoch=EPOCH + n * 77)
    for n, k in ((1, 0), (2, 4), (3, 10), (4, 15))
}


@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("slack", [0, 1, 3])
def test_resolve_within_slack_and_not_beyond(gate: str, slack: int) -> None:
    schedule = GATES[gate]
    period = rotation_period_s(schedule.exponent)
    shown_at = EPOCH + 5_000_000.25
    shown = schedule.eid_at(shown_at)
    # the head-end's clock is off by up to slack whole periods either way
    for offset in range(-slack, slack + 1):
        assert resolve(shown, GATES, shown_at + offset * period, slack_periods=slack) == gate
    # one more period of drift and it must no longer resolve
    for beyond in (slack + 1, -(slack + 1)):
        assert resolve(shown, GATES, shown_at + beyond * period, slack_periods=slack) is None


def test_resolve_unknown_and_bad() -> None:
    assert resolve(bytes(8), GATES, EPOCH + 1234.0) is None
    assert resolve(GATES["gate-2"].eid_at(EPOCH), {}, EPOCH) is None
    with pytest.raises(FrameError):
        resolve(bytes(7), GATES, EPOCH)
    with pytest.raises(FrameError):
        resolve(bytes(8), GATES, EPOCH, slack_periods=-1)
