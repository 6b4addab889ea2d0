"""``fwcm ca``, ``fwcm signer issue``, ``fwcm release`` and ``fwcm audit verify``: the signing
service from the command line.  Keys are made and used on the server (in its HSM); only the
operator root's key stays on the operator's own (offline) machine."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from fwcm import pki
from fwcm.cli.apikeys import audit
from fwcm.cli.common import JsonOpt, api, fail, print_json, print_table, short
from fwcm.cli.manifest import expand_uri, hash_file, resolve_ids
from fwcm.cli.signers import signer_app

ca_app = typer.Typer(help="The tenant CA whose key the server holds.", no_args_is_help=True)
release_app = typer.Typer(help="Manifests signed by the server after their approvals.", no_args_is_help=True)
audit_app = typer.Typer(help="Who did what: the tenant's audit log (hash-chained).")

ROOT_KEY, ROOT_CERT = "root.key.pem", "root.pem"


def _root(root_dir: Path) -> tuple[Any, Any]:
    from fwcm.manifest import ManifestError, load_private_key

    try:
        key = load_private_key((root_dir / ROOT_KEY).read_bytes())
        cert = pki.load_cert((root_dir / ROOT_CERT).read_bytes())
    except (OSError, ManifestError, pki.ChainError) as exc:
        raise fail(f"{root_dir}: {exc}") from None
    return key, cert


def certify_ca(root_dir: Path, public_key_pem: bytes, tenant: str, days: int) -> bytes:
    """The operator root's certificate for a tenant CA public key (run where the root key is)."""
    from fwcm.manifest import ManifestError, load_public_key

    key, cert = _root(root_dir)
    try:
        ca = pki.make_tenant_ca(key, cert, load_public_key(public_key_pem), tenant, days=days)
    except (ValueError, ManifestError) as exc:
        raise fail(str(exc)) from None
    return pki.cert_pem(ca)


@ca_app.command("create")
def ca_create(
    tenant: Annotated[str, typer.Option("--tenant", help="This tenant's slug (the CA's subject O)")],
    root_dir: Annotated[
        Path | None,
        typer.Option(
            "--root-dir", help="Operator root (root.key.pem, root.pem): certify and install at once"
        ),
    ] = None,
    public_key_out: Annotated[
        Path | None, typer.Option("--public-key-out", help="Write the CA public key here for the operator")
    ] = None,
    alg: Annotated[str, typer.Option("--alg", help="es256 or eddsa")] = "es256",
    days: Annotated[int, typer.Option("--days", min=1)] = 1825,
    as_json: JsonOpt = False,
) -> None:
    """Have the server generate the tenant CA key inside its HSM.  With --root-dir the operator
    root certifies it here and the certificate is installed; otherwise hand the public key to the
    operator (`fwcm ca certify` on the offline machine) and run `fwcm ca install`."""
    with api() as client:
        ca = client.post(f"/signing/ca?alg={alg}")
        if root_dir is not None:
            cert = certify_ca(root_dir, ca["public_key_pem"].encode(), tenant, days)
            ca = client.request("PUT", "/signing/ca/cert", json={"cert_pem": cert.decode()}).json()
    if public_key_out is not None:
        public_key_out.write_text(ca["public_key_pem"])
    if as_json:
        print_json(ca)
    elif ca["certified"]:
        typer.echo(f"tenant CA key generated in the {ca['store']} key store and certified by the root")
    else:
        typer.echo(
            f"tenant CA key generated in the {ca['store']} key store; public key:\n{ca['public_key_pem']}"
        )
        typer.echo("next: `fwcm ca certify` on the root's machine, then `fwcm ca install CERT`")


@ca_app.command("certify")
def ca_certify(
    public_key: Annotated[Path, typer.Argument(help="The CA public key PEM from `fwcm ca create`")],
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant's slug")],
    root_dir: Annotated[Path, typer.Option("--root-dir", help="Directory of root.key.pem and root.pem")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the tenant CA certificate")],
    days: Annotated[int, typer.Option("--days", min=1)] = 1825,
) -> None:
    """The offline step of the key ceremony: the operator root certifies a held CA key (no server)."""
    try:
        pem = public_key.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {public_key}: {exc}") from None
    out.write_bytes(certify_ca(root_dir, pem, tenant, days))
    typer.echo(f"tenant CA certificate for {tenant} written to {out}")


@ca_app.command("install")
def ca_install(
    cert: Annotated[Path, typer.Argument(help="The tenant CA certificate from `fwcm ca certify`")],
    as_json: JsonOpt = False,
) -> None:
    """Install the root's certificate for the held CA key."""
    with api() as client:
        ca = client.request("PUT", "/signing/ca/cert", json={"cert_pem": cert.read_text()}).json()
    if as_json:
        print_json(ca)
    else:
        typer.echo("tenant CA certificate installed")


@signer_app.command("issue")
def signer_issue(
    name: Annotated[str, typer.Argument(help="Signer name", metavar="NAME")],
    hardware_id: Annotated[
        list[str] | None, typer.Option("--hardware-id", help="Developer signer: hardware it may target")
    ] = None,
    alg: Annotated[str, typer.Option("--alg", help="es256 or eddsa")] = "es256",
    approvals: Annotated[
        int | None, typer.Option("--approvals", min=0, help="Approvals a release needs (1; 0 for developers)")
    ] = None,
    approver_role: Annotated[str, typer.Option("--approver-role")] = "admin",
    requester_role: Annotated[str, typer.Option("--requester-role")] = "operator",
    as_json: JsonOpt = False,
) -> None:
    """Have the server generate a signer key in its HSM and certify it with the held tenant CA."""
    body: dict[str, Any] = {
        "name": name,
        "alg": alg,
        "approver_role": approver_role,
        "requester_role": requester_role,
    }
    if hardware_id:
        body["hardware_ids"] = hardware_id
    if approvals is not None:
        body["approvals"] = approvals
    with api() as client:
        sg = client.post("/signing/signers", body)
    if as_json:
        print_json(sg)
    else:
        kind = f"developer signer for {', '.join(sg['hardware_ids'])}" if sg["hardware_ids"] else "signer"
        typer.echo(
            f"{kind} {sg['name']} issued ({sg['alg']}, key in the {sg['store']} key store); "
            f"releases need {sg['approvals']} approval(s) by {sg['approver_role']}"
        )


def _release_row(r: dict[str, Any]) -> list[Any]:
    approved = ",".join(a["key"] for a in r["approvals"])
    return [
        r["id"],
        r["state"],
        r["signer"],
        r["sequence"],
        r["image_digest"][:16],
        r["requested_by"],
        f"{len(r['approvals'])}/{r['approvals_needed']} {approved}".strip(),
        r["manifest_id"] or "",
        short(r["requested_at"]),
    ]


COLUMNS = ["id", "state", "signer", "sequence", "image", "requested by", "approvals", "manifest", "requested"]


def _show(r: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(r)
    else:
        print_table(None, COLUMNS, [_release_row(r)])


@release_app.command("create")
def release_create(
    firmware: Annotated[Path, typer.Argument(help="The firmware image", metavar="FIRMWARE")],
    signer: Annotated[str, typer.Option("--signer", help="A signer the server holds")],
    sequence: Annotated[int, typer.Option("--sequence", min=0, help="Sequence number (anti-rollback)")],
    uri: Annotated[
        list[str], typer.Option("--uri", help="Payload URI, repeatable; '{sha256}' becomes the image digest")
    ],
    vendor_id: Annotated[uuid.UUID | None, typer.Option("--vendor-id")] = None,
    class_id: Annotated[uuid.UUID | None, typer.Option("--class-id")] = None,
    vendor_domain: Annotated[str | None, typer.Option("--vendor-domain")] = None,
    model: Annotated[str | None, typer.Option("--model")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Label of the manifest")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload FIRMWARE and ask the server to sign its manifest with a held signer; the answer is
    ``pending`` until the signer's approvals are given, ``signed`` when it needs none."""
    vendor, klass = resolve_ids(vendor_id, vendor_domain, class_id, model)
    digest, size = hash_file(firmware)
    body = {
        "signer": signer,
        "sequence": sequence,
        "vendor_id": str(vendor),
        "class_id": str(klass),
        "image_digest": digest.hex(),
        "image_size": size,
        "uris": [expand_uri(u, digest) for u in uri],
        "name": name,
    }
    with api() as client:
        client.upload("/payloads", firmware, "application/octet-stream", name=firmware.name)
        r = client.post("/releases", body)
    _show(r, as_json)


@release_app.command("approve")
def release_approve(
    release_id: Annotated[int, typer.Argument(metavar="ID")], as_json: JsonOpt = False
) -> None:
    """Approve a pending release with this key (not the requester's); the last approval signs it."""
    with api() as client:
        _show(client.post(f"/releases/{release_id}/approve"), as_json)


@release_app.command("reject")
def release_reject(
    release_id: Annotated[int, typer.Argument(metavar="ID")],
    reason: Annotated[str | None, typer.Option("--reason")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Refuse a pending release: it is never signed."""
    with api() as client:
        _show(client.post(f"/releases/{release_id}/reject", {"reason": reason}), as_json)


@release_app.command("list")
def release_list(
    state: Annotated[str | None, typer.Option("--state", help="pending, signed or rejected")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The tenant's releases, oldest first."""
    with api() as client:
        rows = client.items("/releases", state=state)
    if as_json:
        print_json(rows)
    else:
        print_table("releases", COLUMNS, [_release_row(r) for r in rows])


@audit_app.callback(invoke_without_command=True)
def audit_log(
    ctx: typer.Context,
    since: Annotated[
        str | None, typer.Option("--since", help="Only entries at or after this time (RFC 3339)")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many")] = 100,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip this many newer entries")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Who did what: the tenant's mutating API requests and signing events, newest first."""
    if ctx.invoked_subcommand is None:
        audit(since=since, limit=limit, offset=offset, as_json=as_json)


@audit_app.command("verify")
def audit_verify(as_json: JsonOpt = False) -> None:
    """Check the audit chain: exit 1 when an entry was altered or removed."""
    with api() as client:
        report = client.get("/audit/verify")
    if as_json:
        print_json(report)
    elif report["ok"]:
        typer.echo(f"audit chain intact: {report['checked']} entries; head {report['head']}")
    for problem in report["problems"] if not as_json else []:
        typer.echo(f"  {problem}", err=True)
    if not report["ok"]:
        raise fail(f"audit chain broken: {len(report['problems'])} problem(s)")
