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


def _mac(key: bytes, protected: bytes, payload: bytes) -> bytes:
    structure = cbor2.dumps(["MAC0", protected, b"", payload])
    return hmac.digest(key, structure, "sha256")[:8]


def seal(key: bytes, kid: str, body: dict[int, Any]) -> bytes:
    """Encode ``body`` and wrap it in a COSE_Mac0 keyed with the device secret."""
    payload = cbor2.dumps(body, canonical=True)
    tag = _mac(key, _PROTECTED, payload)
    return cbor2.dumps(cbor2.CBORTag(COSE_MAC0_TAG, [_PROTECTED, {_HDR_KID: kid.encode()}, payload, tag]))


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
