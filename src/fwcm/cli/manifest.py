"""``fwcm manifest``: create, inspect and verify signed SUIT manifests locally (no server needed)."""

from __future__ import annotations

import dataclasses
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

from fwcm import delta
from fwcm.manifest import (
    ALG_ED25519,
    ALG_EDDSA,
    ALG_ES256,
    ALG_ESP256,
    Component,
    ComponentText,
    DeltaPatch,
    Envelope,
    ManifestError,
    ManifestInfo,
    ManifestText,
    PublicKey,
    SignatureError,
    build_envelope,
    class_id_for,
    decode_envelope,
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
SIGNING_ALGS = {"esp256": ALG_ESP256, "ed25519": ALG_ED25519, "es256": ALG_ES256, "eddsa": ALG_EDDSA}
"""``--alg`` names: the fully-specified ids (the default by key type) and the older polymorphic ones."""


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


def parse_components(firmware: Path | None, components: list[str]) -> list[tuple[bytes, Path]]:
    """(component id, image file) pairs from FIRMWARE (component "fw") or ``--component NAME=FILE``."""
    if (firmware is None) == (not components):
        raise fail("give either FIRMWARE or one or more --component NAME=FILE")
    if firmware is not None:
        return [(b"fw", firmware)]
    out: list[tuple[bytes, Path]] = []
    for spec in components:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise fail(f"--component {spec!r}: expected NAME=FILE")
        if any(name.encode() == cid for cid, _ in out):
            raise fail(f"--component {name} given twice")
        out.append((name.encode(), Path(file)))
    return out


def build_texts(
    ids: list[bytes],
    description: str | None,
    vendor_name: str | None,
    model_name: str | None,
    versions: list[str],
    vendor_domain: str | None,
    model: str | None,
) -> tuple[ManifestText, ...]:
    """The text section from the --text-* options (none given: no text section)."""
    if not (description or vendor_name or model_name or versions):
        return ()
    by_component: dict[bytes, str] = {}
    for spec in versions:
        name, sep, version = spec.rpartition("=")
        cid = name.encode() if sep else ids[0]
        if cid not in ids:
            raise fail(f"--text-version {spec!r}: no component {name!r}")
        by_component[cid] = version
    entries = []
    for i, cid in enumerate(ids):
        first = i == 0
        text = ComponentText(
            vendor_name=vendor_name if first else None,
            model_name=model_name if first else None,
            vendor_domain=vendor_domain if first else None,
            model_info=model if first else None,
            version=by_component.get(cid),
        )
        if text.as_dict():
            entries.append(((cid,), text))
    return (ManifestText(language="en", manifest_description=description, components=tuple(entries)),)


def make_delta(base: Path, firmware: Path, patch_output: Path, uris: list[str]) -> DeltaPatch:
    """Diff BASE to FIRMWARE, write the patch and describe it; ``{sha256}`` in URIs is the patch's."""
    old, new = read_bytes(base, "base image"), read_bytes(firmware, "firmware")
    try:
        patch = delta.make_patch(old, new)
    except delta.DeltaError as exc:
        raise fail(str(exc)) from None
    if not delta.worth_sending(len(patch), len(new)):
        log.warning(
            "the patch (%d bytes) is not much smaller than the image (%d bytes)", len(patch), len(new)
        )
    try:
        patch_output.write_bytes(patch)
    except OSError as exc:
        raise fail(f"cannot write {patch_output}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(patch).digest()
    return DeltaPatch(
        base_digest=hashlib.sha256(old).digest(),
        base_size=len(old),
        patch_digest=digest,
        patch_size=len(patch),
        uris=tuple(expand_uri(u, digest) for u in uris),
    )


@app.command()
def create(
    firmware: Path | None = typer.Argument(
        None,
        metavar="[FIRMWARE]",
        help="The firmware image (component 'fw'); its SHA-256 and size go into the manifest.",
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
    component: list[str] = typer.Option(
        [],
        "--component",
        help="NAME=FILE, repeatable instead of FIRMWARE: one image per component, installed together.",
    ),
    alg: str | None = typer.Option(
        None,
        "--alg",
        help="Signing algorithm: esp256 or es256 (P-256), ed25519 or eddsa (Ed25519). "
        "Default: the key's fully-specified one (esp256, ed25519).",
    ),
    description: str | None = typer.Option(None, "--text-description", help="Text: what the update is."),
    vendor_name: str | None = typer.Option(None, "--text-vendor", help="Text: the vendor's name."),
    model_name: str | None = typer.Option(None, "--text-model", help="Text: the model's name."),
    text_version: list[str] = typer.Option(
        [], "--text-version", help="Text: [COMPONENT=]VERSION, repeatable (no COMPONENT: the first)."
    ),
    delta_from: Path | None = typer.Option(
        None,
        "--delta-from",
        help="Make a delta manifest: the patch from this base image to FIRMWARE ('{sha256}' in --uri is "
        "the patch's digest).",
    ),
    patch_output: Path | None = typer.Option(None, "--patch-output", help="Where to write the patch."),
) -> None:
    """Sign a manifest for FIRMWARE (or several --component images) and write the SUIT envelope."""
    vendor, klass = resolve_ids(vendor_id, vendor_domain, class_id, model)
    images = parse_components(firmware, component)
    if (delta_from is None) != (patch_output is None):
        raise fail("--delta-from and --patch-output go together")
    if delta_from is not None and firmware is None:
        raise fail("a delta manifest is for one FIRMWARE image")
    if len(images) > 1 and not all(SHA256_PLACEHOLDER in u for u in uri):
        raise fail(f"with several components every --uri needs {SHA256_PLACEHOLDER} (one payload per image)")
    if alg is not None and alg.lower() not in SIGNING_ALGS:
        raise fail(f"unknown --alg {alg!r} (use one of: {', '.join(SIGNING_ALGS)})")
    try:
        signing_key = load_private_key(read_bytes(key, "key"))
    except ManifestError as exc:
        raise fail(f"{key}: {exc}") from None
    parts = []
    for cid, path in images:
        digest, size = hash_file(path)
        parts.append(Component((cid,), digest, size, tuple(expand_uri(u, digest) for u in uri)))
    chain = load_chain(x5chain) if x5chain is not None else None
    first = parts[0]
    texts = build_texts(
        [c.id[0] for c in parts], description, vendor_name, model_name, text_version, vendor_domain, model
    )
    info = ManifestInfo(
        sequence=sequence,
        vendor_id=vendor,
        class_id=klass,
        image_digest=first.image_digest,
        image_size=first.image_size,
        uris=first.uris,
        component_id=first.id,
        extra_components=tuple(parts[1:]),
        texts=texts,
    )
    if delta_from is not None and patch_output is not None and firmware is not None:
        info = dataclasses.replace(info, uris=(), delta=make_delta(delta_from, firmware, patch_output, uri))
    try:
        envelope = build_envelope(
            info, signing_key, x5chain=chain, alg=SIGNING_ALGS[alg.lower()] if alg else None
        )
        signed_with = decode_envelope(envelope).signatures[0].alg_name
    except ManifestError as exc:
        raise fail(str(exc)) from None
    try:
        output.write_bytes(envelope)
    except OSError as exc:
        raise fail(f"cannot write {output}: {exc.strerror or exc}") from None
    log.info("wrote manifest %s sequence=%d image=%s", output, sequence, first.image_digest.hex())
    images_text = ", ".join(
        f"{c.id[0].decode(errors='replace')} {c.image_size} bytes sha256 {c.image_digest.hex()}"
        for c in parts
    )
    what = (
        f"image {first.image_size} bytes sha256 {first.image_digest.hex()}"
        if len(parts) == 1
        else f"{len(parts)} components ({images_text})"
    )
    if info.delta is not None:
        base = info.delta.base_digest.hex()[:16]
        what += f", delta: {patch_output} ({info.delta.patch_size} bytes) from base {base}"
    uris_count = len(info.delta.uris) if info.delta is not None else len(info.uris)
    typer.echo(
        f"wrote {output} ({len(envelope)} bytes): sequence {sequence}, {what}, "
        f"{uris_count} URI(s), {signed_with} kid {key_id(signing_key).hex()[:16]}"
    )


def decode_file(path: Path) -> Envelope:
    data = read_bytes(path, "manifest")
    try:
        return decode_envelope(data)
    except ManifestError as exc:
        raise fail(f"{path} is not a valid manifest: {exc}") from None


def component_name(cid: tuple[bytes, ...]) -> str:
    """A component id for people: its parts as text when printable, else hex."""
    parts = []
    for p in cid:
        text = p.decode("ascii", errors="replace")
        parts.append(text if text.isprintable() and text.isascii() and "\ufffd" not in text else p.hex())
    return "/".join(parts)


def envelope_dict(env: Envelope) -> dict[str, Any]:
    """The JSON shape of ``fwcm manifest inspect --json``: the first image's fields at the top (as for
    a single-component manifest), every image under ``components``."""
    info = env.info
    return {
        "sequence": info.sequence,
        "vendor_id": str(info.vendor_id),
        "class_id": str(info.class_id),
        "image_digest": info.image_digest.hex(),
        "image_size": info.image_size,
        "uris": list(info.uris),
        "components": [
            {
                "component": [p.hex() for p in c.id],
                "name": component_name(c.id),
                "image_digest": c.image_digest.hex(),
                "image_size": c.image_size,
                "uris": list(c.uris),
            }
            for c in info.components
        ],
        "text": [t.as_dict() for t in info.texts],
        "severable": [
            {"key": m.key, "name": m.name, "digest": m.digest.hex(), "present": m.present}
            for m in env.severable
        ],
        "reference_uri": info.reference_uri,
        "delta": None
        if info.delta is None
        else {
            "base_digest": info.delta.base_digest.hex(),
            "base_size": info.delta.base_size,
            "patch_digest": info.delta.patch_digest.hex(),
            "patch_size": info.delta.patch_size,
            "uris": list(info.delta.uris),
        },
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
    """Show what a manifest says (decoded, not signature-checked: use `verify` for that).

    Severable members the envelope carries have been checked against their digests in the manifest."""
    env = decode_file(file)
    data = envelope_dict(env)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(title=f"{file} (signature not checked)", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name in ("sequence", "vendor_id", "class_id"):
        table.add_row(name.replace("_", " "), str(data[name]))
    if data["reference_uri"]:
        table.add_row("reference uri", data["reference_uri"])
    several = len(data["components"]) > 1
    for c in data["components"]:
        prefix = f"{c['name']}: " if several else ""
        if several:
            table.add_row("component", c["name"])
        table.add_row(f"{prefix}image digest", c["image_digest"])
        table.add_row(f"{prefix}image size", str(c["image_size"]))
        for i, u in enumerate(c["uris"], 1):
            table.add_row(f"{prefix}uri {i}", u)
    if data["delta"]:
        d = data["delta"]
        table.add_row("delta base", f"{d['base_digest']} ({d['base_size']} bytes)")
        table.add_row("delta patch", f"{d['patch_digest']} ({d['patch_size']} bytes)")
        for i, u in enumerate(d["uris"], 1):
            table.add_row(f"patch uri {i}", u)
    table.add_row("manifest digest", data["manifest_digest"])
    for member in data["severable"]:
        state = "carried, digest matches" if member["present"] else "severed"
        table.add_row(f"{member['name']} ({member['key']})", f"{state}: sha256 {member['digest']}")
    for text in data["text"]:
        lang = text["language"]
        for key in ("manifest_description", "update_description"):
            if key in text:
                table.add_row(f"text [{lang}] {key.split('_')[0]}", text[key])
        for c in text["components"]:
            name = component_name(tuple(bytes.fromhex(p) for p in c["component"]))
            fields = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in c.items() if k != "component")
            table.add_row(f"text [{lang}] {name}", fields)
    for i, sig in enumerate(data["signatures"], 1):
        chain = f", x5chain {sig['x5chain']} cert(s)" if sig["x5chain"] else ""
        table.add_row(f"signature {i}", f"{sig['alg']} ({sig['alg_id']}) kid {sig['kid'] or '-'}{chain}")
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
    components = env.info.components
    what = (
        f"image {env.info.image_size} bytes sha256 {env.info.image_digest.hex()}"
        if len(components) == 1
        else f"{len(components)} components ("
        + ", ".join(f"{component_name(c.id)} {c.image_size} bytes" for c in components)
        + ")"
    )
    sig = next((s for s in env.signatures if s.kid == key_id(trusted)), env.signatures[0])
    typer.echo(f"valid: sequence {env.info.sequence}, {what}, signed by {signer} (kid {kid}, {sig.alg_name})")
