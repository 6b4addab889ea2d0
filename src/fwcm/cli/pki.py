"""``fwcm pki``: the certificate hierarchy for manifest signers, kept as local PEM files.

The operator runs ``init-root`` once and ``tenant-ca`` per tenant; a tenant runs ``signer`` to certify
a key made by ``fwcm keys generate``.  The signer file holds the signer certificate followed by its
tenant CA, which is exactly the chain ``fwcm manifest create --x5chain`` carries in a manifest.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import typer
from cryptography import x509
from rich.console import Console
from rich.table import Table

from fwcm import pki
from fwcm.manifest import (
    ManifestError,
    PrivateKey,
    PublicKey,
    generate_private_key,
    key_id,
    load_private_key,
    load_public_key,
    private_key_pem,
)
from fwcm.manifest.keys import public_of

from .keys import fail, write_file
from .manifest import load_chain, read_bytes

log = logging.getLogger(__name__)

app = typer.Typer(
    help="Certificate chains for manifest signers (root CA, tenant CAs, signers).", no_args_is_help=True
)

ROOT_KEY, ROOT_CERT = "root.key.pem", "root.pem"
CA_KEY, CA_CERT = "ca.key.pem", "ca.pem"


# --- files -----------------------------------------------------------------------------------------


def _check_free(paths: list[Path], force: bool) -> None:
    if not force:
        for path in paths:
            if path.exists():
                raise fail(f"{path} exists (use --force to overwrite)")


def _write_pair(
    directory: Path, key: PrivateKey, key_name: str, pem: bytes, cert_name: str, force: bool
) -> None:
    """The private key (mode 0600) and its certificate (0644) side by side in ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_file(directory / key_name, private_key_pem(key), mode=0o600, force=force)
        write_file(directory / cert_name, pem, mode=0o644, force=force)
    except OSError as exc:
        raise fail(f"cannot write {exc.filename or directory}: {exc.strerror or exc}") from None


def _load_issuer(
    directory: Path, key_name: str, cert_name: str, what: str
) -> tuple[PrivateKey, x509.Certificate]:
    """An issuing CA's key and certificate from the files ``init-root`` / ``tenant-ca`` wrote."""
    key_path, cert_path = directory / key_name, directory / cert_name
    try:
        key = load_private_key(read_bytes(key_path, f"{what} key"))
        cert = pki.load_cert(read_bytes(cert_path, f"{what} certificate"))
    except (ManifestError, pki.ChainError) as exc:
        raise fail(f"{directory}: {exc}") from None
    return key, cert


def _load_signer_key(path: Path) -> PublicKey:
    """A signer's public key from its NAME.pub, or from NAME.key (only the public half is used)."""
    data = read_bytes(path, "signer key")
    try:
        return load_public_key(data) if b"PUBLIC KEY-----" in data else public_of(load_private_key(data))
    except ManifestError as exc:
        raise fail(f"{path}: {exc}") from None


def _load_certs(paths: list[Path]) -> list[bytes]:
    return [der for path in paths for der in load_chain(path)]


# --- output ----------------------------------------------------------------------------------------


def cert_dict(cert: x509.Certificate) -> dict[str, Any]:
    """The JSON shape of one certificate in ``fwcm pki show --json``."""
    try:
        bc: x509.BasicConstraints | None = cert.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
    except x509.ExtensionNotFound:
        bc = None
    try:
        kid: str | None = key_id(public_of(cert.public_key())).hex()  # type: ignore[arg-type]
    except ManifestError:
        kid = None  # a key type manifests cannot be signed with (e.g. an RSA root): no kid
    try:
        hardware_ids = pki.hardware_ids_of(cert)
    except pki.ChainError:
        hardware_ids = None
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "ca": bool(bc and bc.ca),
        "path_length": bc.path_length if bc else None,
        "hardware_ids": list(hardware_ids) if hardware_ids is not None else None,
        "key_id": kid,
    }


def signer_dict(info: pki.SignerInfo) -> dict[str, Any]:
    """The JSON shape of ``fwcm pki verify --json`` for a valid chain."""
    return {
        "valid": True,
        "tenant": info.tenant,
        "name": info.name,
        "key_id": info.key_id.hex(),
        "hardware_ids": list(info.hardware_ids) if info.hardware_ids is not None else None,
        "not_after": info.not_after.isoformat(),
        "serial": format(info.serial, "x"),
    }


def _echo_issued(as_json: bool, what: str, paths: list[Path], cert: x509.Certificate) -> None:
    data = cert_dict(cert)
    if as_json:
        typer.echo(json.dumps({"files": [str(p) for p in paths], "certificate": data}, indent=2))
        return
    typer.echo(
        f"wrote {' and '.join(str(p) for p in paths)}: {what} {data['subject']}, "
        f"valid until {data['not_after']}, kid {(data['key_id'] or '-')[:16]}"
    )


def _utc(at: dt.datetime | None) -> dt.datetime | None:
    return at.replace(tzinfo=dt.UTC) if at is not None and at.tzinfo is None else at


# --- commands --------------------------------------------------------------------------------------


@app.command("init-root")
def init_root(
    directory: Path = typer.Option(..., "--dir", help=f"Directory for {ROOT_KEY} (0600) and {ROOT_CERT}."),
    name: str = typer.Option("fwcm root CA", "--name", help="Common name of the root."),
    alg: str = typer.Option("es256", "--alg", help="es256 (P-256) or eddsa (Ed25519)."),
    days: int = typer.Option(3650, "--days", min=1, help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Create the operator's root CA (self-signed; certifies tenant CAs only)."""
    if alg not in ("es256", "eddsa"):
        raise fail(f"unknown algorithm {alg!r} (use es256 or eddsa)")
    paths = [directory / ROOT_KEY, directory / ROOT_CERT]
    _check_free(paths, force)
    key = generate_private_key(alg)
    try:
        cert = pki.make_root(key, name, days=days)
    except ValueError as exc:
        raise fail(str(exc)) from None
    _write_pair(directory, key, ROOT_KEY, pki.cert_pem(cert), ROOT_CERT, force)
    log.info("created root CA %s in %s", name, directory)
    _echo_issued(as_json, "root CA", paths, cert)


@app.command("tenant-ca")
def tenant_ca(
    root_dir: Path = typer.Option(..., "--root-dir", help=f"Directory holding {ROOT_KEY} and {ROOT_CERT}."),
    tenant: str = typer.Option(..., "--tenant", help="Tenant slug the CA certifies signers for."),
    out_dir: Path = typer.Option(..., "--out-dir", help=f"Directory for {CA_KEY} (0600) and {CA_CERT}."),
    alg: str = typer.Option("es256", "--alg", help="es256 (P-256) or eddsa (Ed25519) for the CA key."),
    days: int = typer.Option(1825, "--days", min=1, help="Validity in days (never beyond the root's)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Create a tenant CA certified by the root (certifies signers only, never another CA)."""
    if alg not in ("es256", "eddsa"):
        raise fail(f"unknown algorithm {alg!r} (use es256 or eddsa)")
    root_key, root_cert = _load_issuer(root_dir, ROOT_KEY, ROOT_CERT, "root")
    paths = [out_dir / CA_KEY, out_dir / CA_CERT]
    _check_free(paths, force)
    key = generate_private_key(alg)
    try:
        cert = pki.make_tenant_ca(root_key, root_cert, public_of(key), tenant, days=days)
    except ValueError as exc:
        raise fail(str(exc)) from None
    _write_pair(out_dir, key, CA_KEY, pki.cert_pem(cert), CA_CERT, force)
    log.info("created tenant CA for %s in %s", tenant, out_dir)
    _echo_issued(as_json, "tenant CA", paths, cert)


@app.command("signer")
def signer(
    ca_dir: Path = typer.Option(..., "--ca-dir", help=f"Directory holding {CA_KEY} and {CA_CERT}."),
    key: Path = typer.Option(..., "--key", help="The signer's key: NAME.pub (or NAME.key) from `fwcm keys`."),
    name: str = typer.Option(..., "--name", help="Common name of the signer."),
    hardware_id: list[str] = typer.Option(
        [], "--hardware-id", help="Developer-build signer: only for this device; repeatable."
    ),
    out: Path = typer.Option(..., "--out", help="Where to write the signer certificate + tenant CA (PEM)."),
    days: int = typer.Option(730, "--days", min=1, help="Validity in days (never beyond the CA's)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Certify a signing key; --out holds the chain to pass to `fwcm manifest create --x5chain`."""
    ca_key, ca_cert = _load_issuer(ca_dir, CA_KEY, CA_CERT, "tenant CA")
    public_key = _load_signer_key(key)
    _check_free([out], force)
    try:
        cert = pki.make_signer(ca_key, ca_cert, public_key, name, hardware_ids=hardware_id or None, days=days)
    except ValueError as exc:
        raise fail(str(exc)) from None
    try:
        write_file(out, pki.cert_pem(cert) + pki.cert_pem(ca_cert), mode=0o644, force=force)
    except OSError as exc:
        raise fail(f"cannot write {out}: {exc.strerror or exc}") from None
    log.info("certified signer %s (%s)", name, out)
    kind = "developer-build signer" if hardware_id else "signer"
    _echo_issued(as_json, kind, [out], cert)


@app.command("show")
def show(
    cert_file: Path = typer.Argument(..., metavar="CERT", help="PEM file with one or more certificates."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show each certificate of a PEM file (not validated: use `verify` for that)."""
    try:
        data = [cert_dict(pki.load_cert(der)) for der in load_chain(cert_file)]
    except ValueError as exc:  # garbled extensions surface only when read
        raise fail(f"{cert_file}: {exc}") from None
    if as_json:
        typer.echo(json.dumps({"certificates": data}, indent=2))
        return
    console = Console()
    for i, item in enumerate(data, 1):
        table = Table(title=f"{cert_file} certificate {i} of {len(data)}", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for field in (
            "subject",
            "issuer",
            "serial",
            "not_before",
            "not_after",
            "ca",
            "path_length",
            "key_id",
        ):
            table.add_row(field.replace("_", " "), str(item[field]))
        hw = item["hardware_ids"]
        shown = ", ".join(hw) if hw is not None else "-" if item["ca"] else "none (production signer)"
        table.add_row("hardware ids", shown)
        console.print(table)


@app.command("verify")
def verify(
    chain: list[Path] = typer.Argument(..., metavar="CHAIN_PEM...", help="PEM files, leaf first."),
    root: Path = typer.Option(..., "--root", help="The trusted root certificate (PEM)."),
    at: dt.datetime | None = typer.Option(None, "--at", help="Validate at this time (default now, UTC)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (also on refusal)."),
) -> None:
    """Exit 0 only when the chain certifies a manifest signer under --root."""
    try:
        root_cert = pki.load_cert(read_bytes(root, "root certificate"))
    except pki.ChainError as exc:
        raise fail(f"{root}: {exc}") from None
    try:
        info = pki.validate_chain(_load_certs(chain), root_cert, at=_utc(at))
    except pki.ChainError as exc:
        if as_json:
            typer.echo(json.dumps({"valid": False, "reason": exc.reason, "message": str(exc)}))
            raise typer.Exit(1) from None
        raise fail(f"chain refused ({exc.reason}): {exc}") from None
    if as_json:
        typer.echo(json.dumps(signer_dict(info), indent=2))
        return
    kind = (
        "production" if info.hardware_ids is None else f"developer build for {', '.join(info.hardware_ids)}"
    )
    typer.echo(
        f"valid: signer {info.name!r} of tenant {info.tenant} ({kind}), kid {info.key_id.hex()[:16]}, "
        f"until {info.not_after.isoformat()}"
    )
