"""The little DER fwcm writes and reads by hand: TLVs, and a SEQUENCE OF UTF8String, the value of
the hardware-ids certificate extension (``fwcm.pki``), which ``cryptography`` leaves to us.
Strict DER: minimal lengths, no trailing bytes, UTF-8 checked."""

from __future__ import annotations

from collections.abc import Sequence


class DerError(ValueError):
    """Not a strict DER SEQUENCE OF UTF8String."""


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = (n.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + n.to_bytes(size, "big") + content


def encode_utf8_sequence(items: Sequence[str]) -> bytes:
    return tlv(0x30, b"".join(tlv(0x0C, s.encode()) for s in items))


def read_tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """One DER TLV at ``pos``: (tag, content, end); refuses truncation and non-minimal lengths."""
    if pos + 2 > len(data):
        raise DerError("truncated DER")
    tag, first, pos = data[pos], data[pos + 1], pos + 2
    length = first
    if first & 0x80:
        size = first & 0x7F
        if not 1 <= size <= 4 or pos + size > len(data) or data[pos] == 0:
            raise DerError("bad DER length")
        length = int.from_bytes(data[pos : pos + size], "big")
        if length < 0x80:
            raise DerError("non-minimal DER length")
        pos += size
    if pos + length > len(data):
        raise DerError("truncated DER")
    return tag, data[pos : pos + length], pos + length


def decode_utf8_sequence(data: bytes) -> tuple[str, ...]:
    tag, content, end = read_tlv(data, 0)
    if tag != 0x30 or end != len(data):
        raise DerError("not a DER SEQUENCE")
    items: list[str] = []
    pos = 0
    while pos < len(content):
        tag, value, pos = read_tlv(content, pos)
        if tag != 0x0C:
            raise DerError("entries must be UTF8String")
        try:
            items.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            raise DerError("invalid UTF-8") from None
    return tuple(items)
