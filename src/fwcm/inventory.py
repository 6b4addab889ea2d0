"""Factory batches for claim-once ownership: made at the factory, checked when uploaded (pure
apart from ``write_batch``).

A manufacturer makes, per device, a serial, a hardware id, a claim code (printed on the box), a
32-byte message-MAC secret and an attestation key pair.  Three artefacts come out of a batch:

* ``factory.csv``: uploaded with ``fwcm factory register``; holds the SHA-256 of each claim code and
  the public attestation key, never the claim code or a private key;
* ``labels.csv``: serial and claim code, as printed on each box;
* ``devices/<serial>.json``: what is flashed into each device (secret, attestation private key).

An upload (that CSV, or the same as a JSON list) is checked as a whole by ``parse_factory_body``:
every bad entry is listed and nothing is registered.  The claim code is hashed exactly as typed
apart from surrounding whitespace (see ``claim_hash``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fwcm import manifest
from fwcm.devices import (
    MAX_IMPORT_ERRORS,
    SECRET_BYTES,
    ImportProblems,
    check_sequence,
    optional_text,
    read_csv_header,
)
from fwcm.errors import Invalid
from fwcm.names import check_name

FACTORY_CSV_COLUMNS = (
    "serial",
    "hardware_id",
    "vendor",
    "model",
    "firmware_version",
    "sequence",
    "claim_hash",
    "secret",
    "attest_key_pem",
)
"""Columns of the file ``POST /api/v1/factory/devices`` accepts as CSV (attest_key_pem optional)."""
FACTORY_REQUIRED = ("serial", "hardware_id", "vendor", "model", "claim_hash", "secret")
_CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
_CODE_GROUPS = 4
_CODE_GROUP_LEN = 4
_HEX = set("0123456789abcdef")


def normalize_claim_code(code: str) -> str:
    """The claim code as hashed: surrounding whitespace removed, nothing else changed."""
    return code.strip()


def claim_hash(code: str) -> str:
    """Hex SHA-256 of a claim code: what the manufacturer uploads and what a claim is checked against."""
    return hashlib.sha256(normalize_claim_code(code).encode("utf-8")).hexdigest()


def new_claim_code() -> str:
    """A random claim code like ``7KQ2-M9XD-4HTR-B0WE`` (80 bits, unambiguous characters)."""
    groups = [
        "".join(secrets.choice(_CODE_ALPHABET) for _ in range(_CODE_GROUP_LEN)) for _ in range(_CODE_GROUPS)
    ]
    return "-".join(groups)


@dataclass(frozen=True)
class FactoryUnit:
    """One device of a factory batch, with everything made for it at the factory."""

    serial: str
    hardware_id: str
    vendor: str
    model: str
    firmware_version: str
    sequence: int
    claim_code: str
    secret: bytes
    attest_private_pem: str
    attest_public_pem: str

    @property
    def vendor_id(self) -> str:
        return str(manifest.vendor_id_for_domain(self.vendor))

    @property
    def class_id(self) -> str:
        return str(manifest.class_id_for(manifest.vendor_id_for_domain(self.vendor), self.model))

    def factory_row(self) -> dict[str, Any]:
        """What the manufacturer uploads: the claim code only as its hash, no private key."""
        return {
            "serial": self.serial,
            "hardware_id": self.hardware_id,
            "vendor": self.vendor,
            "model": self.model,
            "firmware_version": self.firmware_version,
            "sequence": self.sequence,
            "claim_hash": claim_hash(self.claim_code),
            "secret": self.secret.hex(),
            "attest_key_pem": self.attest_public_pem,
        }

    def provisioning(self) -> dict[str, Any]:
        """What is flashed into the device itself."""
        return {
            "serial": self.serial,
            "hardware_id": self.hardware_id,
            "vendor": self.vendor,
            "model": self.model,
            "vendor_id": self.vendor_id,
            "class_id": self.class_id,
            "firmware_version": self.firmware_version,
            "sequence": self.sequence,
            "secret": self.secret.hex(),
            "attest_private_key_pem": self.attest_private_pem,
        }


def make_batch(
    count: int,
    vendor: str,
    model: str,
    *,
    firmware_version: str = "1.0.0",
    sequence: int = 0,
    serial_prefix: str | None = None,
) -> list[FactoryUnit]:
    """``count`` new devices of one model; serials are ``PREFIX-BATCH-NNNNN`` with a random batch id."""
    if count < 1:
        raise ValueError("count must be at least 1")
    if not vendor or not model:
        raise ValueError("vendor and model are required")
    if sequence < 0:
        raise ValueError("sequence must not be negative")
    prefix = serial_prefix if serial_prefix is not None else "SN"
    batch = secrets.token_hex(3).upper()
    width = max(5, len(str(count)))
    units = []
    for i in range(1, count + 1):
        key = manifest.generate_private_key("es256")
        serial = f"{prefix}-{batch}-{i:0{width}d}" if prefix else f"{batch}-{i:0{width}d}"
        units.append(
            FactoryUnit(
                serial=serial,
                hardware_id=f"hw-{secrets.token_hex(8)}",
                vendor=vendor,
                model=model,
                firmware_version=firmware_version,
                sequence=sequence,
                claim_code=new_claim_code(),
                secret=secrets.token_bytes(SECRET_BYTES),
                attest_private_pem=manifest.private_key_pem(key).decode(),
                attest_public_pem=manifest.public_key_pem(key).decode(),
            )
        )
    return units


def _csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def factory_csv(units: Sequence[FactoryUnit]) -> str:
    """The upload for ``fwcm factory register`` (PEM keys are quoted multi-line fields)."""
    return _csv(FACTORY_CSV_COLUMNS, [u.factory_row() for u in units])


def labels_csv(units: Sequence[FactoryUnit]) -> str:
    """Serial and claim code per box."""
    return _csv(("serial", "claim_code"), [{"serial": u.serial, "claim_code": u.claim_code} for u in units])


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def write_batch(units: Sequence[FactoryUnit], out: Path) -> dict[str, Path]:
    """Write ``factory.csv``, ``labels.csv`` and ``devices/<serial>.json`` (secrets: mode 0600)."""
    out.mkdir(parents=True, exist_ok=True)
    devices = out / "devices"
    devices.mkdir(exist_ok=True)
    factory = out / "factory.csv"
    labels = out / "labels.csv"
    # factory.csv carries the MAC secrets: readable by its owner only, like the device files.
    _write_private(factory, factory_csv(units))
    _write_private(labels, labels_csv(units))
    for u in units:
        _write_private(devices / f"{u.serial}.json", json.dumps(u.provisioning(), indent=2) + "\n")
    return {"factory": factory, "labels": labels, "devices": devices}


# -- an upload, checked -----------------------------------------------------------------------


@dataclass
class FactoryEntry:
    """A validated factory device, before it is registered."""

    serial: str
    hardware_id: str
    vendor_id: str
    class_id: str
    firmware_version: str | None
    sequence: int
    claim_hash: str
    secret: bytes
    attest_key_pem: str | None


def _text(value: Any, field: str, max_len: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"{field} is required")
    value = value.strip()
    if len(value) > max_len:
        raise Invalid(f"{field} is longer than {max_len} characters")
    return value


def _hex(value: Any, field: str, nbytes: int) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{field} is required ({2 * nbytes} hex digits)")
    text = value.strip().lower()
    if len(text) != 2 * nbytes or not set(text) <= _HEX:
        raise Invalid(f"{field} must be {2 * nbytes} hex digits ({nbytes} bytes)")
    return text


def _attest_key(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise Invalid("attest_key_pem must be a PEM public key")
    try:
        key = manifest.load_public_key(value.strip().encode())
    except manifest.ManifestError as exc:
        raise Invalid(f"attest_key_pem refused: {exc}") from None
    return manifest.public_key_pem(key).decode()


def validate_factory_device(
    serial: Any,
    hardware_id: Any,
    vendor: Any,
    model: Any,
    claim_hash: Any,
    secret: Any,
    firmware_version: Any = None,
    sequence: Any = 0,
    attest_key_pem: Any = None,
) -> FactoryEntry:
    """Check one factory device; raise Invalid naming the first bad field.

    ``vendor`` is the vendor's domain and ``model`` the device model: the ids follow the manifest
    convention (vendor_id = uuid5(DNS, vendor), class_id = uuid5(vendor_id, model)).
    """
    serial_s = check_name(serial.strip() if isinstance(serial, str) else serial, "serial")
    hw = _text(hardware_id, "hardware_id", 128)
    vendor_s = _text(vendor, "vendor", 253)
    model_s = _text(model, "model", 200)
    vendor_id = manifest.vendor_id_for_domain(vendor_s)
    return FactoryEntry(
        serial=serial_s,
        hardware_id=hw,
        vendor_id=str(vendor_id),
        class_id=str(manifest.class_id_for(vendor_id, model_s)),
        firmware_version=optional_text(
            firmware_version.strip() if isinstance(firmware_version, str) else firmware_version,
            "firmware_version",
            64,
        ),
        sequence=check_sequence(sequence),
        claim_hash=_hex(claim_hash, "claim_hash", 32),
        secret=bytes.fromhex(_hex(secret, "secret", SECRET_BYTES)),
        attest_key_pem=_attest_key(attest_key_pem),
    )


def _validate_all(
    items: Sequence[tuple[str, dict[str, Any]]], problems: ImportProblems, seen: dict[str, str]
) -> list[FactoryEntry]:
    out = []
    for where, values in items:
        try:
            entry = validate_factory_device(**values)
        except Invalid as exc:
            problems.add(where, str(exc))
            continue
        if entry.serial in seen:
            problems.add(where, f"serial {entry.serial!r} already appears on {seen[entry.serial]}")
            continue
        seen[entry.serial] = where
        out.append(entry)
    return out


def parse_factory_csv(text: str, max_errors: int = MAX_IMPORT_ERRORS) -> list[FactoryEntry]:
    """Validate a whole factory CSV; raise ImportErrors listing every bad line (up to a cap)."""
    problems = ImportProblems(max_errors)
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    columns = read_csv_header(reader, FACTORY_CSV_COLUMNS, FACTORY_REQUIRED)
    rows: list[tuple[str, dict[str, Any]]] = []
    width = len(columns)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.add(f"line {reader.line_num}", str(exc))
            break
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != width:
            problems.add(f"line {start}", f"expected {width} fields, found {len(row)}")
            continue
        # A quoted PEM spans several physical lines: errors name the line the record starts on.
        rows.append((f"line {start}", dict(zip(columns, row, strict=True))))
    entries = _validate_all(rows, problems, {})
    problems.raise_any()
    return entries


def parse_factory_json(data: Any, max_errors: int = MAX_IMPORT_ERRORS) -> list[FactoryEntry]:
    """Validate a JSON list of factory devices; errors name items by 1-based position."""
    if not isinstance(data, list):
        raise Invalid("expected a JSON list of devices")
    problems = ImportProblems(max_errors)
    fields = set(FACTORY_CSV_COLUMNS)
    items: list[tuple[str, dict[str, Any]]] = []
    for i, item in enumerate(data, 1):
        if not isinstance(item, dict):
            problems.add(f"item {i}", "expected an object")
            continue
        unknown = sorted(set(item) - fields)
        missing = [f for f in FACTORY_REQUIRED if f not in item]
        if unknown or missing:
            parts = ([f"unknown field(s) {', '.join(unknown)}"] if unknown else []) + (
                [f"missing field(s) {', '.join(missing)}"] if missing else []
            )
            problems.add(f"item {i}", "; ".join(parts))
            continue
        items.append((f"item {i}", item))
    entries = _validate_all(items, problems, {})
    problems.raise_any()
    return entries


def parse_factory_body(body: bytes, content_type: str) -> list[FactoryEntry]:
    """A factory upload as JSON (``application/json``) or CSV (anything else textual)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Invalid(f"body is not UTF-8 (byte {exc.start})") from None
    if "json" in content_type.lower():
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise Invalid(f"body is not valid JSON: {exc}") from None
        return parse_factory_json(data)
    return parse_factory_csv(text)
