"""``fwcm manifest``: create, inspect and verify signed SUIT manifests locally (no server needed)."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.table import Table

from fwcm.manifest import (
    Envelope,
    ManifestError,
    ManifestInfo,
    PublicKey,
    SignatureError,
    build_envelope,
    class_id_for,
    decode_envelope,
    key_alg,
    key_id,
    load_private_key,
    load_public_key,
    vendor_id_for_domain,
    verify_envelope,
)

from .keys import fail

log = logging.getLogger(__name__)

app = typer.Typer(help="Create, inspect and verify signed SUIT manifests.", no_args_is_help=True)

SHA256_PLACEHOLDER = "{sha256}"
"""Replaced in ``--uri`` values by the image's hex SHA-256, e.g. ``coap://host/p/{sha256}``."""


def read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def hash_file(path: Path) -> tuple[bytes, int]:
    """SHA-256 and size of ``path``, streamed so large images never sit in memory."""
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise fail(f"cannot read firmware {path}: {exc.strerror or exc}") from None
    return digest.digest(), size


def expand_uri(uri: str, digest: bytes) -> str:
    return uri.replace(SHA256_PLACEHOLDER, digest.hex())


def load_chain(path: Path) -> list[bytes]:
    """DER certificates from a PEM bundle, in file order (leaf first)."""
    try:
        certs = x509.load_pem_x509_certificates(read_bytes(path, "certificate chain"))
    except ValueError as exc:
        raise fail(f"{path} is not a PEM certificate chain: {exc}") from None
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def resolve_ids(
    vendor_id: uuid.UUID | None, vendor_domain: str | None, class_id: uuid.UUID | None, model: str | None
) -> tuple[uuid.UUID, uuid.UUID]:
    """Vendor and class IDs from explicit UUIDs or the UUID5 convention (domain, model)."""
    if (vendor_id is None) == (vendor_domain is None):
        raise fail("give exactly one of --vendor-id or --vendor-domain")
    if (class_id is None) == (model is None):
        raise fail("give exactly one of --class-id or --model")
    vendor = vendor_id if vendor_id is not None else vendor_id_for_domain(str(vendor_domain))
    klass = class_id if class_id is not None else class_id_for(vendor, str(model))
    return vendor, klass


@app.command()
def create(
    firmware: Path = typer.Argument(
        ..., metavar="FIRMWARE", help="The firmware image; its SHA-256 and size go into the manifest."
    ),
    key: Path = typer.Option(..., "--key", help="Private key file (NAME.key from `fwcm keys generate`)."),
    uri: list[str] = typer.Option(
        ...,
        "--uri",
        help="Payload URI, repeatable (tried in order). '{sha256}' is replaced by the image's hex digest.",
    ),
    sequence: int = typer.Option(..., "--sequence", min=0, help="Sequence number (anti-rollback)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the signed envelope."),
    vendor_id: uuid.UUID | None = typer.Option(None, "--vendor-id", help="Vendor ID (UUID)."),
    class_id: uuid.UUID | None = typer.Option(None, "--class-id", help="Class ID (UUID)."),
    vendor_domain: str | None = typer.Option(
        None, "--vendor-domain", help="Derive the vendor ID: uuid5(NAMESPACE_DNS, DOMAIN)."
    ),
    model: str | None = typer.Option(None, "--model", help="Derive the class ID: uuid5(vendor ID, MODEL)."),
    x5chain: Path | None = typer.Option(
        None, "--x5chain", help="PEM certificate chain (leaf first) to carry in the signature (label 33)."
    ),
) -> None:
    """Sign a manifest for FIRMWARE and write the SUIT envelope to --output."""
    vendor, klass = resolve_ids(vendor_id, vendor_domain, class_id, model)
    try:
        signing_key = load_private_key(read_bytes(key, "key"))
    except ManifestError as exc:
        raise fail(f"{key}: {exc}") from None
    digest, size = hash_file(firmware)
    chain = load_chain(x5chain) if x5chain is not None else None
    info = ManifestInfo(
        sequence=sequence,
        vendor_id=vendor,
        class_id=klass,
        image_digest=digest,
        image_size=size,
        uris=tuple(expand_uri(u, digest) for u in uri),
    )
    try:
        envelope = build_envelope(info, signing_key, x5chain=chain)
    except ManifestError as exc:
        raise fail(str(exc)) from None
    try:
        output.write_bytes(envelope)
    except OSError as exc:
        raise fail(f"cannot write {output}: {exc.strerror or exc}") from None
    log.info("wrote manifest %s sequence=%d image=%s", output, sequence, digest.hex())
    typer.echo(
        f"wrote {output} ({len(envelope)} bytes): sequence {sequence}, image {size} bytes "
        f"sha256 {digest.hex()}, {len(info.uris)} URI(s), {key_alg(signing_key).upper()} "
        f"kid {key_id(signing_key).hex()[:16]}"
    )


def decode_file(path: Path) -> Envelope:
    data = read_bytes(path, "manifest")
    try:
        return decode_envelope(data)
    except ManifestError as exc:
        raise fail(f"{path} is not a valid manifest: {exc}") from None


def envelope_dict(env: Envelope) -> dict[str, Any]:
    """The JSON shape of ``fwcm manifest inspect --json``."""
    info = env.info
    return {
        "sequence": info.sequence,
        "vendor_id": str(info.vendor_id),
        "class_id": str(info.class_id),
        "image_digest": info.image_digest.hex(),
        "image_size": info.image_size,
        "uris": list(info.uris),
        "manifest_digest": env.digest.hex(),
        "envelope_size": len(env.raw),
        "signatures": [
            {
                "alg": sig.alg_name,
                "alg_id": sig.alg,
                "kid": sig.kid.hex() if sig.kid is not None else None,
                "x5chain": len(sig.x5chain),
            }
            for sig in env.signatures
        ],
    }


@app.command()
def inspect(
    file: Path = typer.Argument(..., metavar="FILE", help="A SUIT envelope."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show what a manifest says (decoded, not signature-checked: use `verify` for that)."""
    env = decode_file(file)
    data = envelope_dict(env)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(title=f"{file} (signature not checked)", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name in ("sequence", "vendor_id", "class_id", "image_digest", "image_size", "manifest_digest"):
        table.add_row(name.replace("_", " "), str(data[name]))
    for i, u in enumerate(data["uris"], 1):
        table.add_row(f"uri {i}", u)
    for i, sig in enumerate(data["signatures"], 1):
        chain = f", x5chain {sig['x5chain']} cert(s)" if sig["x5chain"] else ""
        table.add_row(f"signature {i}", f"{sig['alg']} kid {sig['kid'] or '-'}{chain}")
    Console().print(table)


@app.command()
def verify(
    file: Path = typer.Argument(..., metavar="FILE", help="A SUIT envelope."),
    key: list[Path] = typer.Option(..., "--key", help="Trusted public key file (NAME.pub); repeatable."),
) -> None:
    """Exit 0 only when FILE is a well-formed manifest signed by one of the given keys."""
    keys: list[tuple[Path, PublicKey]] = []
    for path in key:
        try:
            keys.append((path, load_public_key(read_bytes(path, "key"))))
        except ManifestError as exc:
            raise fail(f"{path}: {exc}") from None
    env = decode_file(file)
    names = ", ".join(str(p) for p, _ in keys)
    try:
        trusted = verify_envelope(env, [k for _, k in keys])
    except SignatureError as exc:
        detail = f": {exc}" if "unknown key" in str(exc) else ""
        raise fail(f"signature does not verify with {names}{detail}") from None
    signer = next(p for p, k in keys if k is trusted)
    kid = key_id(trusted).hex()[:16]
    typer.echo(
        f"valid: sequence {env.info.sequence}, image {env.info.image_size} bytes "
        f"sha256 {env.info.image_digest.hex()}, signed by {signer} (kid {kid})"
    )
