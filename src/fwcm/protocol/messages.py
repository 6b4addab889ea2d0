"""Device messages: the notice (server → device) and the report (device → server).

Each is a CBOR map with small integer keys (``docs/protocol.md`` holds the CDDL), sealed in a
COSE_Mac0 (:mod:`fwcm.protocol.framing`). Keys 1-9 are the message's own fields; keys from 10 on
are extensions that later features add without changing the frame, each bounded where it is
decoded (the nested maps through their value types in :mod:`fwcm.protocol.values`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fwcm.protocol.fields import (
    ATTEMPT_MAX,
    DETAIL_BYTES,
    FIRMWARE_NAME_BYTES,
    FIRMWARE_VERSION_BYTES,
    IMAGE_DIGEST_BYTES,
    KEY_ID_BYTES,
    NAME_RE,
    NONCE_BYTES,
    NOTICE_TEXT_BYTES,
    SIGNED_OBJECT_BYTES,
    UINT63_MAX,
    ProtocolError,
    as_uint,
    bytes_list,
    check_text,
    clip,
    opt_bytes,
    text,
    uint,
)
from fwcm.protocol.framing import MAX_NOTICE_BYTES, seal, unseal
from fwcm.protocol.values import Accounting, Answer, Invitation, UsageLimits


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
    REVERTED = 21
    """The new image failed its trial boot (health check, or never confirmed): the bootloader
    fell back and the device runs its previous image."""
    BASE_MISMATCH = 22
    """A delta manifest's patch is for another image than the one the device runs (its base
    digest does not match): the full image is what it needs."""


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
"""Invite notice: the :class:`Invitation`."""
NOTICE_PREPARE = 14
"""Update notice of a group install: download and verify, then wait for commit or abort."""
NOTICE_LIMITS = 15
"""Update notice: the :class:`UsageLimits` of the installed software."""
REPORT_EVIDENCE = 10
"""Report: attestation evidence (COSE_Sign1 by the device's attestation key)."""
REPORT_FIRMWARE_NAME = 11
"""Hello: the name of the running firmware."""
REPORT_FIRMWARE_VERSION = 12
"""Hello: the version string of the running firmware."""
REPORT_ANSWER = 13
"""The :class:`Answer` to an invitation."""
REPORT_ACCOUNTING = 14
"""Usage of installed software: an :class:`Accounting` record."""
REPORT_IMAGE_DIGEST = 15
"""Hello, success and reverted reports: the SHA-256 (32 bytes) of the image the device now runs,
after its trial boot confirmed it (or the bootloader fell back to it)."""
REPORT_BOOT_HELLO = 16
"""Success reports: the seq of the hello the device sent on the boot that confirmed the image.
Hellos at or below it were sent before that boot, so however late they arrive (reports and
hellos reach server replicas by different paths) they cannot show a revert of this success."""


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

    @property
    def invitation(self) -> Invitation | None:
        """What an invite notice asks (key 13), if it says."""
        found = self.extra.get(NOTICE_INVITATION)
        return None if found is None else Invitation.from_map(found)

    @property
    def limits(self) -> UsageLimits | None:
        """The usage limits of the software an update notice installs (key 15), if it has any."""
        found = self.extra.get(NOTICE_LIMITS)
        return None if found is None else UsageLimits.from_map(found)

    @classmethod
    def from_map(cls, m: dict[Any, Any]) -> Notice:
        kind_value = uint(m, 1)
        try:
            kind = NoticeKind(kind_value)
        except ValueError:
            raise ProtocolError("shape", f"unknown notice kind {kind_value}") from None
        device = text(m, 2)
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
            campaign=uint(m, 3),
            attempt=uint(m, 4, ATTEMPT_MAX),
            issued=uint(m, 5),
            envelope=opt_bytes(m, 6, MAX_NOTICE_BYTES),
            nonce=nonce,
            revoked=tuple(bytes_list(m.get(8, []), KEY_ID_BYTES)),
            window=None if window is None else (as_uint(window[0], "key 9"), as_uint(window[1], "key 9")),
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
            m[8] = clip(self.detail, DETAIL_BYTES)
        if self.installed_sequence is not None:
            m[9] = self.installed_sequence
        m.update(self.extra)
        return m

    @property
    def answer(self) -> Answer | None:
        """The answer to an invitation (key 13), if the report carries one."""
        found = self.extra.get(REPORT_ANSWER)
        return None if found is None else Answer.from_map(found)

    @property
    def accounting(self) -> Accounting | None:
        """The usage record (key 14), if the report carries one."""
        found = self.extra.get(REPORT_ACCOUNTING)
        return None if found is None else Accounting.from_map(found)

    @property
    def image_digest(self) -> bytes | None:
        """The SHA-256 of the image the device runs (key 15), if the report says."""
        found = self.extra.get(REPORT_IMAGE_DIGEST)
        return found if isinstance(found, bytes) else None

    @property
    def boot_hello(self) -> int | None:
        """The seq of the hello of the boot that confirmed a success (key 16), if the report says."""
        found = self.extra.get(REPORT_BOOT_HELLO)
        return found if type(found) is int else None

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
                as_uint(m[key], f"key {key}", top)
        detail, progress, installed = m.get(8), m.get(7), m.get(9)
        if detail is not None:
            check_text(detail, DETAIL_BYTES, "report detail")
        known = 6 + (detail is not None) + (progress is not None) + (installed is not None)
        extra = {k: v for k, v in m.items() if isinstance(k, int) and k >= 10} if len(m) > known else {}
        for key, v in extra.items():
            check = _REPORT_EXTENSIONS.get(key)
            if check is not None:
                check[0](v, check[1])
        lw_state, lw_result = _LW_STATES.get(state), _RESULTS.get(result)
        if lw_state is None or lw_result is None:
            bad = f"{state} is not a valid LwState" if lw_state is None else f"{result} is not a valid Result"
            raise ProtocolError("shape", f"malformed report: {bad}")
        fields = {
            "device": device,
            "campaign": campaign,
            "attempt": attempt,
            "seq": seq,
            "state": lw_state,
            "result": lw_result,
            "progress": None if progress is None else as_uint(progress, "progress"),
            "detail": detail,
            "installed_sequence": None if installed is None else as_uint(installed, "sequence"),
            "extra": extra,
        }
        # Every field is checked above, so the report is made without the frozen dataclass's
        # per-field ``object.__setattr__``: one is decoded per message (0.6 µs against 2.6).
        report = object.__new__(cls)
        object.__setattr__(report, "__dict__", fields)
        return report


_LW_STATES = {int(s): s for s in LwState}
_RESULTS = {int(r): r for r in Result}


# -- COSE_Mac0 encoding and decoding ------------------------------------------------------


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


# -- extension values of reports and notices (keys >= 10) --------------------------------------


def _check_signed(v: Any, what: str) -> None:
    if not (isinstance(v, bytes) and len(v) <= SIGNED_OBJECT_BYTES):
        raise ProtocolError("shape", f"{what} must be at most {SIGNED_OBJECT_BYTES} bytes")


def _check_firmware_name(v: Any, what: str) -> None:
    check_text(v, FIRMWARE_NAME_BYTES, what)


def _check_firmware_version(v: Any, what: str) -> None:
    check_text(v, FIRMWARE_VERSION_BYTES, what)


def _check_image_digest(v: Any, what: str) -> None:
    if not (isinstance(v, bytes) and len(v) == IMAGE_DIGEST_BYTES):
        raise ProtocolError("shape", f"{what} must be {IMAGE_DIGEST_BYTES} bytes")


def _check_reason(v: Any, what: str) -> None:
    check_text(v, NOTICE_TEXT_BYTES, what)


def _check_prepare(v: Any, what: str) -> None:
    if v is not True:
        raise ProtocolError("shape", f"{what} must be true")


_Check = tuple[Callable[[Any, str], object], str]
_REPORT_EXTENSIONS: dict[int, _Check] = {
    REPORT_EVIDENCE: (_check_signed, "report key 10 (evidence)"),
    REPORT_FIRMWARE_NAME: (_check_firmware_name, "report key 11 (firmware name)"),
    REPORT_FIRMWARE_VERSION: (_check_firmware_version, "report key 12 (firmware version)"),
    REPORT_ANSWER: (Answer.from_map, "report key 13 (answer)"),
    REPORT_ACCOUNTING: (Accounting.from_map, "report key 14 (accounting)"),
    REPORT_IMAGE_DIGEST: (_check_image_digest, "report key 15 (image digest)"),
    REPORT_BOOT_HELLO: (as_uint, "report key 16 (boot hello)"),
}
_NOTICE_EXTENSIONS: dict[int, _Check] = {
    NOTICE_TOKEN: (_check_signed, "notice key 10 (install token)"),
    NOTICE_CREDENTIAL: (_check_signed, "notice key 11 (credential)"),
    NOTICE_REASON: (_check_reason, "notice key 12 (reason)"),
    NOTICE_INVITATION: (Invitation.from_map, "notice key 13 (invitation)"),
    NOTICE_PREPARE: (_check_prepare, "notice key 14 (prepare)"),
    NOTICE_LIMITS: (UsageLimits.from_map, "notice key 15 (limits)"),
}
