"""Bounded decoding of wire fields: every number, text and byte string a device sends is checked
against its documented range where it is decoded, so that nothing a device says can fail in the
database (``docs/protocol.md`` states the bounds in the CDDL).

Every refusal is a :class:`ProtocolError` whose ``reason`` is a short metric label.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import cbor2

NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
"""Tenant slugs and device ids: safe as one MQTT topic level and one CoAP path segment."""

UINT63_MAX = 2**63 - 1
"""Ids, sequence numbers, byte and usage counts, POSIX times: a signed 64-bit column holds them."""
ATTEMPT_MAX = 2**31 - 1
"""Attempts are a 32-bit column."""
DETAIL_BYTES = 200
"""Report detail and accounting detail (UTF-8 bytes)."""
FIRMWARE_NAME_BYTES = 200
FIRMWARE_VERSION_BYTES = 64
MAX_OPTIONS = 8
"""Consent options of a campaign, and so of an answer."""
OPTION_BYTES = 256
"""A consent option's name or value: 64 characters (the campaign's bound) of UTF-8."""
MAX_OPTION_VALUES = 16
NONCE_BYTES = 16
KEY_ID_BYTES = 32
"""Revoked signer key ids: SHA-256 of the key."""
IMAGE_DIGEST_BYTES = 32
"""The SHA-256 of the image a device runs (success reports and hellos)."""
"""Revoked signer key ids: SHA-256 of the key."""
SIGNED_OBJECT_BYTES = 1024
"""Attestation evidence and credentials (COSE_Sign1), install tokens."""
NOTICE_TEXT_BYTES = 800
"""Text the server puts in a notice (reason, requester, campaign name): 200 characters of UTF-8."""


class ProtocolError(ValueError):
    """A message that cannot be accepted; ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def loads(data: bytes) -> Any:
    """CBOR ``data`` decoded; garbage is a ``cbor`` refusal."""
    try:
        return cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types on garbage; all mean the same here
        raise ProtocolError("cbor", f"not CBOR: {exc}") from exc


def as_uint(v: Any, what: str, top: int = UINT63_MAX) -> int:
    if type(v) is not int or not 0 <= v <= top:  # not bool: CBOR decodes integers to int itself
        raise ProtocolError("shape", f"{what} must be an integer in 0..{top}")
    return v


def uint(m: Mapping[Any, Any], key: int, top: int = UINT63_MAX) -> int:
    """The required unsigned integer at ``key`` of ``m``."""
    if key not in m:
        raise ProtocolError("shape", f"missing key {key}")
    return as_uint(m[key], f"key {key}", top)


def text(m: Mapping[Any, Any], key: int) -> str:
    """The required text at ``key`` of ``m``."""
    v = m.get(key)
    if not isinstance(v, str):
        raise ProtocolError("shape", f"key {key} must be text")
    return v


def check_text(v: Any, max_bytes: int, what: str, min_bytes: int = 0) -> str:
    """Text of ``min_bytes..max_bytes`` UTF-8 bytes without NUL (PostgreSQL text cannot hold it)."""
    if type(v) is not str:
        raise ProtocolError("shape", f"{what} must be text")
    size = len(v) if v.isascii() else len(v.encode())
    if not min_bytes <= size <= max_bytes:
        raise ProtocolError("shape", f"{what} must be {min_bytes}..{max_bytes} bytes of UTF-8")
    if "\x00" in v:
        raise ProtocolError("shape", f"{what} must not contain NUL")
    return v


def clip(v: str, max_bytes: int) -> str:
    """The longest prefix of ``v`` that fits ``max_bytes`` of UTF-8."""
    return v if len(v.encode()) <= max_bytes else v.encode()[:max_bytes].decode(errors="ignore")


def opt_bytes(m: Mapping[Any, Any], key: int, max_size: int) -> bytes | None:
    """The optional byte string at ``key`` of ``m``, at most ``max_size`` bytes."""
    v = m.get(key)
    if v is not None and not (isinstance(v, bytes) and len(v) <= max_size):
        raise ProtocolError("shape", f"key {key} must be at most {max_size} bytes")
    return v


def bytes_list(v: Any, size: int) -> list[bytes]:
    if not isinstance(v, list | tuple) or not all(isinstance(x, bytes) and len(x) == size for x in v):
        raise ProtocolError("shape", f"expected a list of {size}-byte strings")
    return list(v)


def check_map(
    v: Any, what: str, allowed: frozenset[int], required: frozenset[int] = frozenset()
) -> Mapping[Any, Any]:
    """``v`` as a map whose keys are among ``allowed`` and include ``required``."""
    if not isinstance(v, Mapping):
        raise ProtocolError("shape", f"{what} must be a map")
    if not v.keys() <= allowed:
        raise ProtocolError("shape", f"{what} has keys other than {sorted(allowed)}")
    if not required <= v.keys():
        raise ProtocolError("shape", f"{what} needs keys {sorted(required)}")
    return v
