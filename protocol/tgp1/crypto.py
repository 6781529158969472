"""TGP1 key derivation and MACs (PURSE.md, algorithm 02: AES-128 CMAC)."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.cmac import CMAC

TX_TYPE_PURCHASE = 0x06


def cmac(key: bytes, data: bytes) -> bytes:
    """AES-128 CMAC (NIST SP 800-38B), full 16 bytes."""
    mac = CMAC(AES(key))
    mac.update(data)
    return mac.finalize()


def card_key(master: bytes, serial: bytes) -> bytes:
    """K_card = CMAC(K_master, "TGP1" || 01 || serial)."""
    return cmac(master, b"TGP1\x01" + serial)


def card_tac_key(master_tac: bytes, serial: bytes) -> bytes:
    """K_card_tac = CMAC(K_master_tac, "TGP1" || 02 || serial)."""
    return cmac(master_tac, b"TGP1\x02" + serial)


@dataclass(frozen=True, slots=True)
class Purchase:
    """Everything both sides feed into the MACs of one purchase."""

    card_random: bytes  # 4
    counter: int  # u16, the counter before the debit
    terminal_seq: int  # u32
    amount: int  # u32
    terminal_id: bytes  # 6
    date: bytes  # 4, BCD YYYYMMDD
    time: bytes  # 3, BCD hhmmss

    def session_key(self, k_card: bytes) -> bytes:
        return cmac(
            k_card,
            self.card_random
            + self.counter.to_bytes(2, "big")
            + self.terminal_seq.to_bytes(4, "big"),
        )

    def mac1(self, sk: bytes) -> bytes:
        data = (
            b"\x01"
            + self.amount.to_bytes(4, "big")
            + bytes([TX_TYPE_PURCHASE])
            + self.terminal_id
            + self.date
            + self.time
        )
        return cmac(sk, data)[:4]

    def mac2(self, sk: bytes) -> bytes:
        return cmac(sk, b"\x02" + self.amount.to_bytes(4, "big"))[:4]

    def tac(self, k_card_tac: bytes) -> bytes:
        data = (
            self.amount.to_bytes(4, "big")
            + bytes([TX_TYPE_PURCHASE])
            + self.terminal_id
            + self.terminal_seq.to_bytes(4, "big")
            + self.counter.to_bytes(2, "big")
            + self.date
            + self.time
        )
        return cmac(k_card_tac, data)[:4]
