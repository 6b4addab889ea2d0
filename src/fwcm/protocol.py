"""Wire messages shared by the server and devices (sans-IO).

Every message between a device and the server is a CBOR map with small integer keys, wrapped in a
COSE_Mac0 (tag 17, HMAC 256/64) keyed with the device's own secret.  The MAC binds a message to one
device: a device that publishes on another device's topic, or replays a report under another name,
fails verification.  ``docs/protocol.md`` holds the CDDL.
"""

from __future__ import annotations

import base64
import enum
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cbor2

PROTOCOL_VERSION = 1
MAX_REPORT_BYTES = 1024
"""Status reports larger than this are refused unread (MQTT: dropped; CoAP: 4.13)."""
MAX_NOTICE_BYTES = 16384

COSE_MAC0_TAG = 17
HMAC_256_64 = 4
_HDR_ALG = 1
_HDR_KID = 4

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Tenant slugs and device ids: safe as one MQTT topic level and one CoAP path segment."""


class ProtocolError(ValueError):
    """A message that cannot be accepted; ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class LwState(enum.IntEnum):
    """LwM2M Firmware Update object (/5) resource 3 values."""

    IDLE = 0
    DOWNLOADING = 1
    DOWNLOADED = 2
    UPDATING = 3


class Result(enum.IntEnum):
    """LwM2M /5 resource 5 values (0-11), extended with fwcm refusals (12+)."""

    INITIAL = 0
    SUCCESS = 1
    NOT_ENOUGH_FLASH = 2
    OUT_OF_RAM = 3
    CONNECTION_LOST = 4
    INTEGRITY_FAILURE = 5
    UNSUPPORTED_PACKAGE = 6
    INVALID_URI = 7
    UPDATE_FAILED = 8
    UNSUPPORTED_PROTOCOL = 9
    CANCELLED = 10
    DEFERRED = 11
    SIGNATURE_INVALID = 12
    CONDITION_MISMATCH = 13
    ROLLBACK_REFUSED = 14
    UP_TO_DATE = 15
    HARDWARE_NOT_LISTED = 16
    SIGNER_REVOKED = 17
    CHAIN_INVALID = 18
    ATTESTATION_REFUSED = 19
    DECLINED = 20


TRANSIENT_RESULTS = frozenset({Result.CONNECTION_LOST, Result.OUT_OF_RAM})
"""Failures worth retrying: the same image may well succeed on a later attempt."""
SKIP_RESULTS = frozenset({Result.CONDITION_MISMATCH, Result.UP_TO_DATE})
"""Refusals that mean "this update is not for me" rather than a failure."""


class NoticeKind(enum.IntEnum):
    UPDATE = 1
    CANCEL = 2
    COMMIT = 3
    ABORT = 4
    INVITE = 5
    CREDENTIAL = 6
    """After a successful attested install: the server-signed installation credential."""


# Extension keys (>= 10) of notices and reports; ``docs/protocol.md`` has the CDDL.
NOTICE_TOKEN = 10
"""Update notice: the install token (COSE_Sign1) that payload endpoints require."""
NOTICE_CREDENTIAL = 11
"""Credential notice: the installation credential (COSE_Sign1)."""
NOTICE_REASON = 12
"""Cancel notice: why (e.g. the attestation was refused)."""
NOTICE_INVITATION = 13
"""Invite notice: ``{1: requester, 2: campaign name, 3: {option: [values]}, 4: deadline, 5: initiator}``."""
NOTICE_PREPARE = 14
"""Update notice of a group install: download and verify, then wait for commit or abort."""
NOTICE_LIMITS = 15
"""Update notice: ``{1: max uses, 2: expires at, 3: accounting interval s}`` of the installed software."""
REPORT_EVIDENCE = 10
"""Report: attestation evidence (COSE_Sign1 by the device's attestation key)."""
REPORT_FIRMWARE_NAME = 11
"""Hello: the name of the running firmware."""
REPORT_FIRMWARE_VERSION = 12
"""Hello: the version string of the running firmware."""
REPORT_ANSWER = 13
"""Answer to an invitation: ``{1: accepted, 2: {option: chosen value}}``."""
REPORT_ACCOUNTING = 14
"""Usage of installed software: ``{1: "interim" | "final" | "removed", 2: uses, 3: seconds, 4: detail}``."""


@dataclass(frozen=True)
class Notice:
    """Server → device: what to do for one campaign attempt.

    Optional fields carry what later features need without changing the frame: an attestation
    nonce, the signer key ids revoked since provisioning, an install window, an invitation.
    """

    kind: NoticeKind
    device: str
    campaign: int
    attempt: int
    issued: int
    envelope: bytes | None = None
    nonce: bytes | None = None
    revoked: tuple[bytes, ...] = ()
    window: tuple[int, int] | None = None
    extra: dict[int, Any] = field(default_factory=dict)

    def to_map(self) -> dict[int, Any]:
        m: dict[int, Any] = {
            1: int(self.kind),
            2: self.device,
            3: self.campaign,
            4: self.attempt,
            5: self.issued,
        }
        if self.envelope is not None:
            m[6] = self.envelope
        if self.nonce is not None:
            m[7] = self.nonce
        if self.revoked:
            m[8] = list(self.revoked)
        if self.window is not None:
            m[9] = list(self.window)
        m.update(self.extra)
        return m

    @classmethod
    def from_map(cls, m: dict[Any, Any]) -> Notice:
        try:
            window = m.get(9)
            return cls(
                kind=NoticeKind(_uint(m, 1)),
                device=_text(m, 2),
                campaign=_uint(m, 3),
                attempt=_uint(m, 4),
                issued=_uint(m, 5),
                envelope=_opt_bytes(m, 6),
                nonce=_opt_bytes(m, 7),
                revoked=tuple(_bytes_list(m.get(8, []))),
                window=(int(window[0]), int(window[1])) if window is not None else None,
                extra={k: v for k, v in m.items() if isinstance(k, int) and k >= 10},
            )
        except ProtocolError:
            raise
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise ProtocolError("shape", f"malformed notice: {exc}") from exc


@dataclass(frozen=True)
class Report:
    """Device → server: one state change of one device in one campaign attempt.

    ``(device, campaign, attempt, seq)`` identifies a report; ``seq`` grows with every report a
    device sends for an attempt, so a duplicate delivered twice is recognised and ignored.
    Campaign 0 is a hello: the device announces what it runs, outside any campaign.
    """

    device: str
    campaign: int
    attempt: int
    seq: int
    state: LwState
    result: Result
    progress: int | None = None
    detail: str | None = None
    installed_sequence: int | None = None
    extra: dict[int, Any] = field(default_factory=dict)

    def to_map(self) -> dict[int, Any]:
        m: dict[int, Any] = {
            1: self.device,
            2: self.campaign,
            3: self.attempt,
            4: self.seq,
            5: int(self.state),
            6: int(self.result),
        }
        if self.progress is not None:
            m[7] = self.progress
        if self.detail is not None:
            m[8] = self.detail[:200]
        if self.installed_sequence is not None:
            m[9] = self.installed_sequence
        m.update(self.extra)
        return m

    @classmethod
    def from_map(cls, m: dict[Any, Any]) -> Report:
        try:
            device, campaign, attempt, seq, state, result = m[1], m[2], m[3], m[4], m[5], m[6]
        except KeyError as exc:
            raise ProtocolError("shape", f"missing key {exc.args[0]}") from None
        if type(device) is not str:
            raise ProtocolError("shape", "key 1 must be text")
        for key, v in ((2, campaign), (3, attempt), (4, seq), (5, state), (6, result)):
            if type(v) is not int or v < 0:  # not bool, not a subclass: what CBOR decodes to
                raise ProtocolError("shape", f"key {key} must be an unsigned integer")
        detail, progress, installed = m.get(8), m.get(7), m.get(9)
        if detail is not None and not isinstance(detail, str):
            raise ProtocolError("shape", "report detail must be text")
        known = 6 + (detail is not None) + (progress is not None) + (installed is not None)
        extra = {k: v for k, v in m.items() if isinstance(k, int) and k >= 10} if len(m) > known else {}
        try:
            return cls(
                device=device,
                campaign=campaign,
                attempt=attempt,
                seq=seq,
                state=LwState(state),
                result=Result(result),
                progress=None if progress is None else _as_uint(progress, "progress"),
                detail=detail,
                installed_sequence=None if installed is None else _as_uint(installed, "sequence"),
                extra=extra,
            )
        except ValueError as exc:
            raise ProtocolError("shape", f"malformed report: {exc}") from exc


# -- COSE_Mac0 framing ------------------------------------------------------------------------

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
        body = _loads(self.payload)
        if not isinstance(body, Mapping):
            raise ProtocolError("shape", "message body is not a CBOR map")
        return dict(body)


def unseal(data: bytes, max_size: int = MAX_REPORT_BYTES) -> Sealed:
    """Parse a COSE_Mac0 frame; raise ProtocolError naming what is wrong."""
    if len(data) > max_size:
        raise ProtocolError("oversized", f"message of {len(data)} bytes exceeds {max_size}")
    obj = _loads(data)
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
            headers = _loads(protected) if protected else {}
        except ProtocolError:
            raise ProtocolError("shape", "protected header is not CBOR") from None
        if not isinstance(headers, Mapping) or headers.get(_HDR_ALG) != HMAC_256_64:
            raise ProtocolError("shape", "unsupported MAC algorithm")
    try:
        kid = unprotected[_HDR_KID].decode()
    except UnicodeDecodeError:
        raise ProtocolError("shape", "kid is not UTF-8") from None
    return Sealed(kid=kid, protected=protected, payload=payload, tag=tag)


def encode_report(key: bytes, report: Report) -> bytes:
    return seal(key, report.device, report.to_map())


def encode_notice(key: bytes, notice: Notice) -> bytes:
    return seal(key, notice.device, notice.to_map())


def decode_report(data: bytes, key: bytes) -> Report:
    """Verify and decode a report with a known key; the MAC'd body must name the kid's device."""
    frame = unseal(data)
    report = Report.from_map(frame.open(key))
    if report.device != frame.kid:
        raise ProtocolError("forbidden", f"report of {report.device!r} under kid {frame.kid!r}")
    return report


def decode_notice(data: bytes, key: bytes) -> Notice:
    frame = unseal(data, MAX_NOTICE_BYTES)
    notice = Notice.from_map(frame.open(key))
    if notice.device != frame.kid:
        raise ProtocolError("forbidden", f"notice for {notice.device!r} under kid {frame.kid!r}")
    return notice


# -- topics and paths -------------------------------------------------------------------------

TOPIC_PREFIX = f"fwcm/v{PROTOCOL_VERSION}"


def notice_topic(tenant: str, device: str) -> str:
    return f"{TOPIC_PREFIX}/{tenant}/{device}/notice"


def status_topic(tenant: str, device: str) -> str:
    return f"{TOPIC_PREFIX}/{tenant}/{device}/status"


def presence_topic(tenant: str, device: str) -> str:
    return f"{TOPIC_PREFIX}/{tenant}/{device}/presence"


STATUS_SUBSCRIPTION = f"{TOPIC_PREFIX}/+/+/status"
PRESENCE_SUBSCRIPTION = f"{TOPIC_PREFIX}/+/+/presence"


def parse_device_topic(topic: str) -> tuple[str, str, str]:
    """``fwcm/v1/{tenant}/{device}/{leaf}`` → (tenant, device, leaf)."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_PREFIX:
        raise ProtocolError("topic", f"unexpected topic {topic!r}")
    return parts[2], parts[3], parts[4]


def coap_notice_path(tenant: str, device: str) -> tuple[str, ...]:
    return ("n", tenant, device)


def coap_status_path(tenant: str, device: str) -> tuple[str, ...]:
    return ("s", tenant, device)


def payload_path(sha256_hex: str) -> str:
    """Path of a payload on both the HTTP and the CoAP server."""
    return f"/p/{sha256_hex}"


# -- helpers ----------------------------------------------------------------------------------


def _loads(data: bytes) -> Any:
    try:
        return cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types on garbage; all mean the same here
        raise ProtocolError("cbor", f"not CBOR: {exc}") from exc


def _as_uint(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ProtocolError("shape", f"{what} must be an unsigned integer")
    return v


def _uint(m: dict[Any, Any], key: int) -> int:
    if key not in m:
        raise ProtocolError("shape", f"missing key {key}")
    return _as_uint(m[key], f"key {key}")


def _text(m: dict[Any, Any], key: int) -> str:
    v = m.get(key)
    if not isinstance(v, str):
        raise ProtocolError("shape", f"key {key} must be text")
    return v


def _opt_bytes(m: dict[Any, Any], key: int) -> bytes | None:
    v = m.get(key)
    if v is not None and not isinstance(v, bytes):
        raise ProtocolError("shape", f"key {key} must be bytes")
    return v


def _bytes_list(v: Any) -> list[bytes]:
    if not isinstance(v, list | tuple) or not all(isinstance(x, bytes) for x in v):
        raise ProtocolError("shape", "expected a list of byte strings")
    return list(v)


# -- device credentials -----------------------------------------------------------------------

DEVICE_PASSWORD_LABEL = b"fwcm device password v1"


def broker_username(tenant: str, device: str) -> str:
    """The device's MQTT username, ``{tenant}/{device}``: unambiguous, as neither name holds ``/``."""
    return f"{tenant}/{device}"


def device_password(secret: bytes, tenant: str, device: str) -> str:
    """The password a device presents where a MAC cannot be sent: its MQTT broker account and its
    CoAP notice observation (``?k=``). Base64url (no padding, 43 characters) of HMAC-SHA-256 keyed
    with the device secret over the label, a zero byte and ``tenant/device``.

    Derived, so a device claimed from a manufacturer's record and the server agree without storing
    anything new; bound to the name, so a tenant that held a claimed device (and saw its password,
    never its secret) cannot log in as it once it belongs to another tenant.
    """
    message = DEVICE_PASSWORD_LABEL + b"\x00" + broker_username(tenant, device).encode()
    return base64.urlsafe_b64encode(hmac.digest(secret, message, "sha256")).rstrip(b"=").decode()
