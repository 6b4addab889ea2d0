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
from collections.abc import Callable, Mapping
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

# Bounds of every field a device sends, checked where a message is decoded, so that nothing a
# device says can fail in the database (``docs/protocol.md`` states them in the CDDL).
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
SIGNED_OBJECT_BYTES = 1024
"""Attestation evidence and credentials (COSE_Sign1), install tokens."""
NOTICE_TEXT_BYTES = 800
"""Text the server puts in a notice (reason, requester, campaign name): 200 characters of UTF-8."""
ACCOUNTING_KINDS = ("interim", "final", "removed")


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
        kind_value = _uint(m, 1)
        try:
            kind = NoticeKind(kind_value)
        except ValueError:
            raise ProtocolError("shape", f"unknown notice kind {kind_value}") from None
        device = _text(m, 2)
        if not NAME_RE.fullmatch(device):
            raise ProtocolError("shape", "key 2 must be a device name")
        window = m.get(9)
        if window is not None and not (isinstance(window, list | tuple) and len(window) == 2):
            raise ProtocolError("shape", "key 9 must be [start, end]")
        nonce = m.get(7)
        if nonce is not None and not (isinstance(nonce, bytes) and len(nonce) == NONCE_BYTES):
            raise ProtocolError("shape", f"key 7 must be {NONCE_BYTES} bytes")
        extra = {k: v for k, v in m.items() if isinstance(k, int) and k >= 10}
        for key, v in extra.items():
            check = _NOTICE_EXTENSIONS.get(key)
            if check is not None:
                check[0](v, check[1])
        return cls(
            kind=kind,
            device=device,
            campaign=_uint(m, 3),
            attempt=_uint(m, 4, ATTEMPT_MAX),
            issued=_uint(m, 5),
            envelope=_opt_bytes(m, 6, MAX_NOTICE_BYTES),
            nonce=nonce,
            revoked=tuple(_bytes_list(m.get(8, []), KEY_ID_BYTES)),
            window=None if window is None else (_as_uint(window[0], "key 9"), _as_uint(window[1], "key 9")),
            extra=extra,
        )


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
            m[8] = _clip(self.detail, DETAIL_BYTES)
        if self.installed_sequence is not None:
            m[9] = self.installed_sequence
        m.update(self.extra)
        return m

    @classmethod
    def from_map(cls, m: dict[Any, Any]) -> Report:
        """Decode a report, refusing (``shape``) every field outside its documented range."""
        try:
            device, campaign, attempt, seq, state, result = m[1], m[2], m[3], m[4], m[5], m[6]
        except KeyError as exc:
            raise ProtocolError("shape", f"missing key {exc.args[0]}") from None
        if type(device) is not str or not NAME_RE.fullmatch(device):
            raise ProtocolError("shape", "key 1 must be a device name")
        if not (  # one expression: this runs for every report (type: not bool, as CBOR decodes)
            type(campaign) is int
            and 0 <= campaign <= UINT63_MAX
            and type(attempt) is int
            and 0 <= attempt <= ATTEMPT_MAX
            and type(seq) is int
            and 0 <= seq <= UINT63_MAX
            and type(state) is int
            and type(result) is int
        ):
            for key, top in ((2, UINT63_MAX), (3, ATTEMPT_MAX), (4, UINT63_MAX), (5, 255), (6, 255)):
                _as_uint(m[key], f"key {key}", top)
        detail, progress, installed = m.get(8), m.get(7), m.get(9)
        if detail is not None:
            _check_text(detail, DETAIL_BYTES, "report detail")
        known = 6 + (detail is not None) + (progress is not None) + (installed is not None)
        extra = {k: v for k, v in m.items() if isinstance(k, int) and k >= 10} if len(m) > known else {}
        for key, v in extra.items():
            check = _REPORT_EXTENSIONS.get(key)
            if check is not None:
                check[0](v, check[1])
        try:
            lw_state, lw_result = LwState(state), Result(result)
        except ValueError as exc:
            raise ProtocolError("shape", f"malformed report: {exc}") from None
        return cls(
            device=device,
            campaign=campaign,
            attempt=attempt,
            seq=seq,
            state=lw_state,
            result=lw_result,
            progress=None if progress is None else _as_uint(progress, "progress"),
            detail=detail,
            installed_sequence=None if installed is None else _as_uint(installed, "sequence"),
            extra=extra,
        )


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


def _as_uint(v: Any, what: str, top: int = UINT63_MAX) -> int:
    if type(v) is not int or not 0 <= v <= top:  # not bool: CBOR decodes integers to int itself
        raise ProtocolError("shape", f"{what} must be an integer in 0..{top}")
    return v


def _uint(m: dict[Any, Any], key: int, top: int = UINT63_MAX) -> int:
    if key not in m:
        raise ProtocolError("shape", f"missing key {key}")
    return _as_uint(m[key], f"key {key}", top)


def _text(m: dict[Any, Any], key: int) -> str:
    v = m.get(key)
    if not isinstance(v, str):
        raise ProtocolError("shape", f"key {key} must be text")
    return v


def _check_text(v: Any, max_bytes: int, what: str, min_bytes: int = 0) -> None:
    """Text of ``min_bytes..max_bytes`` UTF-8 bytes without NUL (PostgreSQL text cannot hold it)."""
    if type(v) is not str:
        raise ProtocolError("shape", f"{what} must be text")
    size = len(v) if v.isascii() else len(v.encode())
    if not min_bytes <= size <= max_bytes:
        raise ProtocolError("shape", f"{what} must be {min_bytes}..{max_bytes} bytes of UTF-8")
    if "\x00" in v:
        raise ProtocolError("shape", f"{what} must not contain NUL")


def _clip(v: str, max_bytes: int) -> str:
    """The longest prefix of ``v`` that fits ``max_bytes`` of UTF-8."""
    return v if len(v.encode()) <= max_bytes else v.encode()[:max_bytes].decode(errors="ignore")


def _opt_bytes(m: dict[Any, Any], key: int, max_size: int) -> bytes | None:
    v = m.get(key)
    if v is not None and not (isinstance(v, bytes) and len(v) <= max_size):
        raise ProtocolError("shape", f"key {key} must be at most {max_size} bytes")
    return v


def _bytes_list(v: Any, size: int) -> list[bytes]:
    if not isinstance(v, list | tuple) or not all(isinstance(x, bytes) and len(x) == size for x in v):
        raise ProtocolError("shape", f"expected a list of {size}-byte strings")
    return list(v)


def _check_map(v: Any, what: str, allowed: frozenset[int], required: frozenset[int] = frozenset()) -> None:
    if not isinstance(v, Mapping):
        raise ProtocolError("shape", f"{what} must be a map")
    if not v.keys() <= allowed:
        raise ProtocolError("shape", f"{what} has keys other than {sorted(allowed)}")
    if not required <= v.keys():
        raise ProtocolError("shape", f"{what} needs keys {sorted(required)}")


# -- extension values of reports and notices (keys >= 10) --------------------------------------


def _check_signed(v: Any, what: str) -> None:
    if not (isinstance(v, bytes) and len(v) <= SIGNED_OBJECT_BYTES):
        raise ProtocolError("shape", f"{what} must be at most {SIGNED_OBJECT_BYTES} bytes")


def _check_firmware_name(v: Any, what: str) -> None:
    _check_text(v, FIRMWARE_NAME_BYTES, what)


def _check_firmware_version(v: Any, what: str) -> None:
    _check_text(v, FIRMWARE_VERSION_BYTES, what)


def _check_options(v: Any, what: str) -> None:
    """``{option: value}`` of an answer: at most MAX_OPTIONS names and values of 1..OPTION_BYTES."""
    if not isinstance(v, Mapping) or len(v) > MAX_OPTIONS:
        raise ProtocolError("shape", f"{what} must be a map of at most {MAX_OPTIONS} options")
    for name, value in v.items():
        _check_text(name, OPTION_BYTES, f"{what} option", 1)
        _check_text(value, OPTION_BYTES, f"{what} value", 1)


def _check_answer(v: Any, what: str) -> None:
    """``{1: accepted, ? 2: {option: value}}``."""
    _check_map(v, what, frozenset({1, 2}), frozenset({1}))
    if type(v[1]) is not bool:
        raise ProtocolError("shape", f"{what}: key 1 must be true or false")
    if 2 in v:
        _check_options(v[2], f"{what}: key 2")


def _check_accounting(v: Any, what: str) -> None:
    """``{1: kind, 2: uses, 3: seconds, ? 4: detail}``."""
    _check_map(v, what, frozenset({1, 2, 3, 4}), frozenset({1, 2, 3}))
    if v[1] not in ACCOUNTING_KINDS or type(v[1]) is not str:
        raise ProtocolError("shape", f"{what}: key 1 must be one of {', '.join(ACCOUNTING_KINDS)}")
    _as_uint(v[2], f"{what}: uses")
    _as_uint(v[3], f"{what}: seconds")
    if 4 in v:
        _check_text(v[4], DETAIL_BYTES, f"{what}: detail")


def _check_reason(v: Any, what: str) -> None:
    _check_text(v, NOTICE_TEXT_BYTES, what)


def _check_invitation(v: Any, what: str) -> None:
    """``{1: requester, 2: campaign name, 3: {option: [values]}, 4: deadline, 5: initiator}``; a
    receiver takes what is there."""
    _check_map(v, what, frozenset({1, 2, 3, 4, 5}))
    for key in (1, 2, 5):
        if key in v:
            _check_text(v[key], NOTICE_TEXT_BYTES, f"{what}: key {key}")
    if 4 in v:
        _as_uint(v[4], f"{what}: deadline")
    options = v.get(3, {})
    if not isinstance(options, Mapping) or len(options) > MAX_OPTIONS:
        raise ProtocolError("shape", f"{what}: key 3 must be a map of at most {MAX_OPTIONS} options")
    for name, values in options.items():
        _check_text(name, OPTION_BYTES, f"{what}: option", 1)
        if not isinstance(values, list | tuple) or not 1 <= len(values) <= MAX_OPTION_VALUES:
            raise ProtocolError("shape", f"{what}: option {name!r} needs 1..{MAX_OPTION_VALUES} values")
        for value in values:
            _check_text(value, OPTION_BYTES, f"{what}: value", 1)


def _check_prepare(v: Any, what: str) -> None:
    if v is not True:
        raise ProtocolError("shape", f"{what} must be true")


def _check_limits(v: Any, what: str) -> None:
    """``{? 1: max uses, ? 2: seconds, ? 3: accounting interval}``."""
    _check_map(v, what, frozenset({1, 2, 3}))
    for key, n in v.items():
        _as_uint(n, f"{what}: key {key}")


_Check = tuple[Callable[[Any, str], None], str]
_REPORT_EXTENSIONS: dict[int, _Check] = {
    REPORT_EVIDENCE: (_check_signed, "report key 10 (evidence)"),
    REPORT_FIRMWARE_NAME: (_check_firmware_name, "report key 11 (firmware name)"),
    REPORT_FIRMWARE_VERSION: (_check_firmware_version, "report key 12 (firmware version)"),
    REPORT_ANSWER: (_check_answer, "report key 13 (answer)"),
    REPORT_ACCOUNTING: (_check_accounting, "report key 14 (accounting)"),
}
_NOTICE_EXTENSIONS: dict[int, _Check] = {
    NOTICE_TOKEN: (_check_signed, "notice key 10 (install token)"),
    NOTICE_CREDENTIAL: (_check_signed, "notice key 11 (credential)"),
    NOTICE_REASON: (_check_reason, "notice key 12 (reason)"),
    NOTICE_INVITATION: (_check_invitation, "notice key 13 (invitation)"),
    NOTICE_PREPARE: (_check_prepare, "notice key 14 (prepare)"),
    NOTICE_LIMITS: (_check_limits, "notice key 15 (limits)"),
}


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
