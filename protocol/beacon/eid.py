"""Eddystone-EID: the 8-byte ephemeral identifier a gate shows, and the head-end's lookup.

google/eddystone ``eddystone-eid/eid-computation.md`` (and its ``tools/eidtools.py``):

* temporary key = AES-128(identity key, ``00``x11 | ``FF`` | ``00 00`` | counter bits 31..16)
* EID = AES-128(temporary key, ``00``x11 | K | counter with its K low bits cleared)[:8]

where the counter is a 32-bit big-endian seconds count and K (0..15) the rotation exponent:
a new EID every 2**K seconds. Here the counter is the seconds since the schedule's epoch, so
the gate and the head-end agree on it as long as their clocks do; ``resolve`` allows for the
drift.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from protocol.beacon.frames import FrameError

MAX_EXPONENT = 15
COUNTER_MODULUS = 2**32


def _check_key(identity_key: bytes) -> None:
    if len(identity_key) != 16:
        raise FrameError(f"an EID identity key is 16 bytes (AES-128), not {len(identity_key)}")


def _check_counter(counter: int) -> None:
    if not 0 <= counter < COUNTER_MODULUS:
        raise FrameError(f"EID counter {counter} outside the 32-bit range")


def _aes_block(key: bytes, block: bytes) -> bytes:
    # ECB on a single block is the raw AES permutation the spec asks for, no mode involved
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return encryptor.update(block) + encryptor.finalize()


def rotation_period_s(exponent: int) -> int:
    if not 0 <= exponent <= MAX_EXPONENT:
        raise FrameError(f"EID rotation exponent {exponent} outside 0..{MAX_EXPONENT}")
    return 1 << exponent


def temporary_key(identity_key: bytes, counter: int) -> bytes:
    _check_key(identity_key)
    _check_counter(counter)
    block = bytes(11) + b"\xff" + bytes(2) + (counter >> 16).to_bytes(2, "big")
    return _aes_block(identity_key, block)


def compute_eid(identity_key: bytes, exponent: int, counter: int) -> bytes:
    _check_key(identity_key)
    _check_counter(counter)
    period = rotation_period_s(exponent)
    quantum_start = counter - counter % period
    block = bytes(11) + bytes([exponent]) + quantum_start.to_bytes(4, "big")
    return _aes_block(temporary_key(identity_key, counter), block)[:8]


@dataclass(frozen=True, slots=True)
class EidSchedule:
    """One gate's EID parameters. ``epoch`` is the unix second its counter reads 0."""

    identity_key: bytes = field(repr=False)
    exponent: int
    epoch: int

    def __post_init__(self) -> None:
        _check_key(self.identity_key)
        rotation_period_s(self.exponent)

    def _elapsed(self, now: float) -> int:
        # whole seconds, as the beacon's counter only ticks once a second
        return math.floor(now) - self.epoch

    def counter(self, now: float) -> int:
        """Seconds since the epoch, as the 32-bit counter holds them (it wraps, as on a beacon)."""
        return self._elapsed(now) % COUNTER_MODULUS

    def eid_at(self, now: float) -> bytes:
        return compute_eid(self.identity_key, self.exponent, self.counter(now))

    def next_rotation(self, now: float) -> float:
        """Unix time of the next EID change after ``now``; every temporary-key change (each
        2**16 s) and the counter's wrap fall on such a boundary too, as K <= 15."""
        period = 1 << self.exponent
        return float(self.epoch + (self._elapsed(now) // period + 1) * period)


def resolve(eid: bytes, schedules: Mapping[str, EidSchedule], now: float, *,
            slack_periods: int = 1) -> str | None:
    """Which gate (key of schedules) shows ``eid`` at ``now``, allowing +-slack_periods
    rotation periods of clock drift; None if no gate does."""
    if len(eid) != 8:
        raise FrameError(f"an EID is 8 bytes, not {len(eid)}")
    if slack_periods < 0:
        raise FrameError(f"EID slack {slack_periods} periods is negative")
    for gate, schedule in schedules.items():
        period = 1 << schedule.exponent
        for step in sorted(range(-slack_periods, slack_periods + 1), key=abs):
            # constant-time compare: how close a guess came must not leak through timing
            if hmac.compare_digest(schedule.eid_at(now + step * period), eid):
                return gate
    return None
