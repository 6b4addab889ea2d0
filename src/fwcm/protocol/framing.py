"""COSE_Mac0 framing of device messages.

Every message between a device and the server is a CBOR map wrapped in a COSE_Mac0 (tag 17,
HMAC 256/64) keyed with the device's own secret; the unprotected header carries the device name
as the key id (``kid``), so the receiver knows which key to check the MAC with. The MAC binds a
message to one device: a device that publishes on another device's topic, or replays a report
under another name, fails verification.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any, NamedTuple

import cbor2

from fwcm.protocol.fields import ProtocolError, loads

MAX_REPORT_BYTES = 1024
"""Status reports larger than this are refused unread (MQTT: dropped; CoAP: 4.13)."""
MAX_NOTICE_BYTES = 16384

COSE_MAC0_TAG = 17
HMAC_256_64 = 4
_HDR_ALG = 1
_HDR_KID = 4
_PROTECTED = cbor2.dumps({_HDR_ALG: HMAC_256_64})


_MAC0_CONTEXT = b"\x84\x64MAC0"  # array(4), text(4) "MAC0": the MAC_structure's first two items
_EMPTY_AAD = b"\x40"
_FRAME_HEAD = b"\xd1\x84"  # tag 17, array(4)
_KID_MAP = b"\xa1\x04"  # {4: kid}
_TAG_HEAD = b"\x48"  # bstr(8)


def _bstr(data: bytes) -> bytes:
    """``data`` as a CBOR byte string (head and bytes), in the shortest form, as cbor2 writes it."""
    n = len(data)
    if n < 24:
        head = bytes((0x40 | n,))
    elif n < 0x100:
        head = bytes((0x58, n))
    elif n < 0x10000:
        head = b"\x59" + n.to_bytes(2, "big")
    else:
        head = b"\x5a" + n.to_bytes(4, "big")
    return head + data


def _mac(key: bytes, protected: bytes, payload: bytes) -> bytes:
    structure = _MAC0_CONTEXT + _bstr(protected) + _EMPTY_AAD + _bstr(payload)
    return hmac.digest(key, structure, "sha256")[:8]


_FLAT = frozenset({int, bool, str, bytes, type(None)})
"""Types that cbor2 encodes the same way with and without ``canonical``."""
_INT = frozenset({int})


def deterministic(body: dict[int, Any]) -> bytes:
    """``body`` in CBOR's deterministic encoding (RFC 8949, 4.2.1), as ``canonical=True`` writes it.

    Most bodies (every report, most notices) already are a map of ascending unsigned keys to flat
    values, which the plain encoder writes identically without sorting: five times cheaper, and
    every notice and report is encoded once."""
    keys = list(body)
    if (
        keys
        and _INT.issuperset(map(type, keys))
        and keys[0] >= 0
        and keys == sorted(keys)
        and _FLAT.issuperset(map(type, body.values()))
    ):
        return cbor2.dumps(body)
    return cbor2.dumps(body, canonical=True)


def seal(key: bytes, kid: str, body: dict[int, Any]) -> bytes:
    """Encode ``body`` and wrap it in a COSE_Mac0 keyed with the device secret. The frame around
    the payload is always the same few bytes (docs/protocol.md, "The frame, byte by byte"), so it
    is written directly rather than encoded: every notice and report is sealed."""
    payload = deterministic(body)
    tag = _mac(key, _PROTECTED, payload)
    return b"".join(
        (_FRAME_HEAD, _bstr(_PROTECTED), _KID_MAP, _bstr(kid.encode()), _bstr(payload), _TAG_HEAD, tag)
    )


class Sealed(NamedTuple):
    """A Mac0 frame parsed but not yet verified: ``kid`` says which key to check it with."""

    kid: str
    protected: bytes
    payload: bytes
    tag: bytes

    def open(self, key: bytes) -> dict[Any, Any]:
        if not hmac.compare_digest(_mac(key, self.protected, self.payload), self.tag):
            raise ProtocolError("mac", f"bad MAC from {self.kid!r}")
        body = loads(self.payload)
        if type(body) is dict:  # what cbor2 makes of a map (checked first: once per message)
            return body
        if not isinstance(body, Mapping):
            raise ProtocolError("shape", "message body is not a CBOR map")
        return dict(body)


def unseal(data: bytes, max_size: int = MAX_REPORT_BYTES) -> Sealed:
    """Parse a COSE_Mac0 frame; raise ProtocolError naming what is wrong."""
    if len(data) > max_size:
        raise ProtocolError("oversized", f"message of {len(data)} bytes exceeds {max_size}")
    obj = loads(data)
    if isinstance(obj, cbor2.CBORTag):
        if obj.tag != COSE_MAC0_TAG:
            raise ProtocolError("shape", f"unexpected CBOR tag {obj.tag}")
        obj = obj.value
    if not (isinstance(obj, (list, tuple)) and len(obj) == 4):
        raise ProtocolError("shape", "not a COSE_Mac0 array")
    protected, unprotected, payload, tag = obj
    if not (isinstance(protected, bytes) and isinstance(payload, bytes) and isinstance(tag, bytes)):
        raise ProtocolError("shape", "COSE_Mac0 fields have wrong types")
    if not isinstance(unprotected, Mapping) or not isinstance(unprotected.get(_HDR_KID), bytes):
        raise ProtocolError("shape", "COSE_Mac0 without kid")
    if protected != _PROTECTED:  # every fwcm sender writes exactly this header: skip decoding it
        try:
            headers = loads(protected) if protected else {}
        except ProtocolError:
            raise ProtocolError("shape", "protected header is not CBOR") from None
        if not isinstance(headers, Mapping) or headers.get(_HDR_ALG) != HMAC_256_64:
            raise ProtocolError("shape", "unsupported MAC algorithm")
    try:
        kid = unprotected[_HDR_KID].decode()
    except UnicodeDecodeError:
        raise ProtocolError("shape", "kid is not UTF-8") from None
    return Sealed(kid=kid, protected=protected, payload=payload, tag=tag)
