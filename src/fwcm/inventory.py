"""Factory batches for claim-once ownership (sans-IO apart from ``write_batch``).

A manufacturer makes, per device, a serial, a hardware id, a claim code (printed on the box), a
32-byte message-MAC secret and an attestation key pair.  Three artefacts come out of a batch:

* ``factory.csv``: uploaded with ``fwcm factory register``; holds the SHA-256 of each claim code and
  the public attestation key, never the claim code or a private key;
* ``labels.csv``: serial and claim code, as printed on each box;
* ``devices/<serial>.json``: what is flashed into each device (secret, attestation private key).

The claim code is hashed exactly as typed apart from surrounding whitespace (see ``claim_hash``).
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

SECRET_BYTES = 32
_CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U
_CODE_GROUPS = 4
_CODE_GROUP_LEN = 4


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
