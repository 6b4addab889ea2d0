"""A fleet device as it enters (pure): one device's fields, and a CSV import of many.

``validate_device`` checks one device (an API body, a CSV row) and returns a ``NewDevice`` ready to
store; ``parse_devices_csv`` checks a whole file and lists every bad line, so an import is all or
nothing.  The checks of single fields (tags, sequence, transport) are shared with claimed devices
and factory batches (``fwcm.inventory``).  Nothing here touches a database: text in, values out,
or ``Invalid`` / ``ImportErrors`` naming the problem.
"""

from __future__ import annotations

import base64
import csv
import functools
import io
import secrets
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fwcm import filters, manifest
from fwcm.errors import ImportErrors, Invalid
from fwcm.names import check_name

TRANSPORTS = ("mqtt", "coap", "lwm2m")
SECRET_BYTES = 32
"""A device's message-MAC secret."""
SEQUENCE_LIMIT = 2**63
"""Sequence numbers are stored as BIGINT: 0 <= sequence < 2**63."""
MAX_IMPORT_ERRORS = 50
"""A refused import lists at most this many problems, then counts the rest."""
CSV_COLUMNS = (
    "name",
    "vendor_id",
    "class_id",
    "tags",
    "sequence",
    "version",
    "transport",
    "hardware_id",
    "secret",
    "attest_key",
)
CSV_REQUIRED = ("name", "vendor_id", "class_id")


@dataclass
class NewDevice:
    """A validated device, before it is stored."""

    name: str
    vendor_id: str
    class_id: str
    tags: dict[str, str]
    sequence: int
    version: str | None
    transport: str
    hardware_id: str | None
    secret: bytes
    attest_key_pem: str | None = None


# -- single fields ----------------------------------------------------------------------------


def check_uuid(value: Any, field: str) -> str:
    """The canonical text of a UUID; Invalid naming ``field`` otherwise."""
    canonical = _canonical_uuid(str(value).strip())
    if canonical is None:
        raise Invalid(f"{field} must be a UUID, got {value!r}")
    return canonical


@functools.lru_cache(maxsize=1024)
def _canonical_uuid(text: str) -> str | None:
    """Cached: a CSV import repeats the same few vendor and class ids on every row."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


def check_tags(value: Any) -> dict[str, str]:
    """Tags as stored: an object of filter-safe keys to text (integers become text)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid("tags must be an object of key → value")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not filters.TAG_KEY_RE.match(k):
            raise Invalid(f"tag key {k!r} is not valid: 1-64 of letters, digits, '_' or '-'")
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise Invalid(f"tag {k!r} must be text or an integer")
        if len(str(v)) > 200:
            raise Invalid(f"tag {k!r} is longer than 200 characters")
        out[k] = str(v)
    return out


def optional_text(value: Any, field: str, max_len: int) -> str | None:
    """Text of at most ``max_len`` characters, or None for nothing or an empty string."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Invalid(f"{field} must be text")
    if len(value) > max_len:
        raise Invalid(f"{field} is longer than {max_len} characters")
    return value


def check_sequence(value: Any) -> int:
    """A firmware sequence number (an integer or its text; nothing means 0)."""
    if value is None or value == "":
        return 0
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise Invalid(f"sequence must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEQUENCE_LIMIT:
        raise Invalid(f"sequence must be a non-negative integer, got {value!r}")
    return value


def check_transport(value: Any) -> str:
    """``mqtt`` (also for nothing), ``coap`` or ``lwm2m``."""
    value = value or "mqtt"
    if value not in TRANSPORTS:
        raise Invalid(f"transport must be one of {', '.join(TRANSPORTS)}, got {value!r}")
    return str(value)


def _secret(value: Any) -> bytes:
    """Hex of SECRET_BYTES bytes (or the bytes); a new random secret when none is given."""
    if value is None or value == "":
        secret = secrets.token_bytes(SECRET_BYTES)
    elif isinstance(value, bytes):
        secret = value
    else:
        try:
            secret = bytes.fromhex(str(value))
        except ValueError:
            raise Invalid("secret must be hex") from None
    if len(secret) != SECRET_BYTES:
        raise Invalid(f"secret must be {SECRET_BYTES} bytes ({2 * SECRET_BYTES} hex digits)")
    return secret


def _attest_key(value: Any) -> str | None:
    """A public attestation key as PEM, or base64 of its DER (one CSV cell); stored as PEM."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Invalid("attestation key must be text (PEM or base64 DER)")
    text = value.strip()
    data = text.encode() if text.startswith("-----BEGIN") else _b64_pem(text)
    try:
        key = manifest.load_public_key(data)
    except manifest.ManifestError as exc:
        raise Invalid(f"attestation key refused: {exc}") from None
    return manifest.public_key_pem(key).decode()


def _b64_pem(text: str) -> bytes:
    try:
        der = base64.b64decode(text, validate=True)
    except ValueError:
        raise Invalid("attestation key is neither PEM nor base64 DER") from None
    lines = [base64.b64encode(der[i : i + 48]).decode() for i in range(0, len(der), 48)]
    return ("-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n").encode()


# -- one device -------------------------------------------------------------------------------


def validate_device(
    name: Any,
    vendor_id: Any,
    class_id: Any,
    tags: Any = None,
    sequence: Any = 0,
    version: Any = None,
    transport: Any = "mqtt",
    hardware_id: Any = None,
    secret: Any = None,
    attest_key_pem: Any = None,
) -> NewDevice:
    """Check one device's fields; raise Invalid naming the first bad one."""
    sequence = check_sequence(sequence)
    transport = check_transport(transport)
    secret_b = _secret(secret)
    return NewDevice(
        name=check_name(name, "device name"),
        vendor_id=check_uuid(vendor_id, "vendor_id"),
        class_id=check_uuid(class_id, "class_id"),
        tags=check_tags(tags),
        sequence=sequence,
        version=optional_text(version, "version", 64),
        transport=transport,
        hardware_id=optional_text(hardware_id, "hardware_id", 128),
        secret=secret_b,
        attest_key_pem=_attest_key(attest_key_pem),
    )


# -- CSV imports ------------------------------------------------------------------------------


class ImportProblems:
    """The problems of one import, capped at ``max_errors`` listed (the rest only counted)."""

    def __init__(self, max_errors: int = MAX_IMPORT_ERRORS) -> None:
        self.errors: list[str] = []
        self.more = 0
        self.max = max_errors

    def add(self, where: str, msg: str) -> None:
        if len(self.errors) < self.max:
            self.errors.append(f"{where}: {msg}")
        else:
            self.more += 1

    def raise_any(self) -> None:
        if self.errors:
            raise ImportErrors(self.errors, self.more)


def parse_csv_tags(text: str) -> dict[str, str]:
    """``k=v;k2=v2`` → dict; raises Invalid for a part without '=' or a repeated key."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        if not sep:
            raise Invalid(f"tag {part!r} is not key=value")
        k = k.strip()
        if k in out:
            raise Invalid(f"tag {k!r} given twice")
        out[k] = v.strip()
    return out


def _listed(names: Sequence[str], shown: int = 10) -> str:
    """Names for an error message: the first ``shown`` (each at most 40 characters), then a count."""
    text = ", ".join(n if len(n) <= 40 else n[:37] + "..." for n in names[:shown])
    return text + (f" and {len(names) - shown:,} more" if len(names) > shown else "")


def read_csv_header(
    reader: Iterator[list[str]], allowed: Sequence[str], required: Sequence[str]
) -> list[str]:
    """The header line of an import, lower-cased; ImportErrors naming unknown, missing or repeated
    columns."""
    try:
        header = next(reader)
    except StopIteration:
        raise ImportErrors(["line 1: empty file; expected a header: " + ",".join(allowed)]) from None
    except csv.Error as exc:
        raise ImportErrors([f"line 1: {exc}"]) from None
    columns = [h.strip().lower() for h in header]
    seen = Counter(columns)  # one pass: the header's length is the sender's choice
    unknown = [c for c in seen if c not in allowed]
    missing = [c for c in required if c not in seen]
    dupes = sorted(c for c, n in seen.items() if n > 1)
    problems = []
    if unknown:
        problems.append(f"unknown column(s) {_listed(unknown)}")
    if missing:
        problems.append(f"missing column(s) {_listed(missing)}")
    if dupes:
        problems.append(f"repeated column(s) {_listed(dupes)}")
    if problems:
        raise ImportErrors([f"line 1: {'; '.join(problems)} (columns: {','.join(allowed)})"])
    return columns


def _csv_device(values: dict[str, str]) -> NewDevice:
    return validate_device(
        name=values["name"].strip(),
        vendor_id=values["vendor_id"],
        class_id=values["class_id"],
        tags=parse_csv_tags(values.get("tags", "")),
        sequence=values.get("sequence"),
        version=values.get("version", "").strip() or None,
        transport=values.get("transport", "").strip() or "mqtt",
        hardware_id=values.get("hardware_id", "").strip() or None,
        secret=values.get("secret", "").strip() or None,
        attest_key_pem=values.get("attest_key", "").strip() or None,
    )


def parse_devices_csv(text: str, max_errors: int = MAX_IMPORT_ERRORS) -> list[NewDevice]:
    """Validate a whole CSV file; raise ImportErrors listing every bad line (up to a cap)."""
    problems = ImportProblems(max_errors)
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    columns = read_csv_header(reader, CSV_COLUMNS, CSV_REQUIRED)
    out: list[NewDevice] = []
    seen: dict[str, int] = {}
    width = len(columns)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.add(f"line {reader.line_num}", str(exc))
            break
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != width:
            problems.add(f"line {line}", f"expected {width} fields, found {len(row)}")
            continue
        try:
            dev = _csv_device(dict(zip(columns, row, strict=True)))
        except Invalid as exc:
            problems.add(f"line {line}", str(exc))
            continue
        if dev.name in seen:
            problems.add(f"line {line}", f"device {dev.name!r} already appears on line {seen[dev.name]}")
            continue
        seen[dev.name] = line
        out.append(dev)
    problems.raise_any()
    return out


# -- changes to a device ------------------------------------------------------------------------


MAX_TAG_CHANGES = 100
"""Tags one update or retag may set or remove."""


@dataclass(frozen=True)
class TagChanges:
    """Tags to set (key → text) and to remove, checked."""

    set: dict[str, str]
    unset: frozenset[str]

    def apply(self, tags: dict[str, Any] | None) -> dict[str, str]:
        """The tags a device has after this change."""
        out = {k: str(v) for k, v in (tags or {}).items() if k not in self.unset}
        out.update(self.set)
        return out

    def __bool__(self) -> bool:
        return bool(self.set or self.unset)


def check_tag_changes(value: Any) -> TagChanges:
    """A JSON merge patch of tags (RFC 7396): ``{"ring": "canary", "old": null}`` sets ``ring`` and
    removes ``old``; Invalid naming the first bad key or value."""
    if value is None:
        return TagChanges({}, frozenset())
    if not isinstance(value, dict):
        raise Invalid("tags must be an object of key → value (null removes the tag)")
    if len(value) > MAX_TAG_CHANGES:
        raise Invalid(f"at most {MAX_TAG_CHANGES} tags can change at once, got {len(value)}")
    unset = frozenset(k for k, v in value.items() if v is None)
    for k in unset:
        if not isinstance(k, str) or not filters.TAG_KEY_RE.match(k):
            raise Invalid(f"tag key {k!r} is not valid: 1-64 of letters, digits, '_' or '-'")
    return TagChanges(check_tags({k: v for k, v in value.items() if v is not None}), unset)


def check_attributes(fields: dict[str, Any]) -> dict[str, str | None]:
    """The attributes an update may change (``version``, ``hardware_id``), checked; None clears one."""
    limits = {"version": 64, "hardware_id": 128}
    unknown = sorted(set(fields) - limits.keys())
    if unknown:
        raise Invalid(f"cannot change {', '.join(unknown)}; only tags, version and hardware_id")
    return {k: optional_text(v, k, limits[k]) for k, v in fields.items()}
