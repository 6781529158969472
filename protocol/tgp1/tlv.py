"""A strict BER-TLV reader: enough for the FCI a TGP1 card returns to SELECT."""

from __future__ import annotations


class TlvError(ValueError):
    """The bytes are not well-formed BER-TLV."""


def parse(data: bytes) -> list[tuple[int, bytes]]:
    """Split ``data`` into (tag, value) pairs; every byte must belong to one."""
    out: list[tuple[int, bytes]] = []
    i = 0
    n = len(data)
    while i < n:
        tag = data[i]
        i += 1
        if tag & 0x1F == 0x1F:  # multi-byte tag
            while True:
                if i >= n:
                    raise TlvError("truncated tag")
                tag = (tag << 8) | data[i]
                i += 1
                if not data[i - 1] & 0x80:
                    break
                if tag > 0xFFFFFF:
                    raise TlvError("tag too long")
        if i >= n:
            raise TlvError(f"tag {tag:X} has no length")
        length = data[i]
        i += 1
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 2 or i + count > n:
                raise TlvError(f"tag {tag:X} has a bad length field")
            length = int.from_bytes(data[i : i + count], "big")
            i += count
        if i + length > n:
            raise TlvError(f"tag {tag:X} claims {length} bytes, {n - i} left")
        out.append((tag, data[i : i + length]))
        i += length
    return out


def as_dict(data: bytes) -> dict[int, bytes]:
    """Like :func:`parse`, refusing a tag that appears twice."""
    result: dict[int, bytes] = {}
    for tag, value in parse(data):
        if tag in result:
            raise TlvError(f"tag {tag:X} appears twice")
        result[tag] = value
    return result
