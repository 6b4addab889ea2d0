"""``fwcm signer …``: the public keys and certificates a tenant trusts to sign its manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fwcm.cli.common import JsonOpt, api, fail, print_json, print_table, short

signer_app = typer.Typer(help="Public keys the tenant trusts to sign manifests.", no_args_is_help=True)


@signer_app.command("add")
def signer_add(
    name: Annotated[str, typer.Argument(help="Signer name", metavar="NAME")],
    key: Annotated[
        Path | None, typer.Option("--key", help="Public key PEM (NAME.pub from `fwcm keys generate`)")
    ] = None,
    cert: Annotated[
        Path | None, typer.Option("--cert", help="Signer certificate PEM (from `fwcm pki signer`)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Trust a signer for this tenant's manifests: a bare public key, or a certificate that the
    tenant's CA issued (developer certificates limit their builds to listed hardware)."""
    if (key is None) == (cert is None):
        raise fail("give exactly one of --key or --cert")
    path = key or cert
    assert path is not None
    try:
        pem = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read {path}: {exc}") from None
    body = {"name": name, "public_key_pem": pem} if key else {"name": name, "cert_pem": pem}
    with api() as client:
        sg = client.post("/signers", body)
    if as_json:
        print_json(sg)
    else:
        kind = "certified" if sg.get("certified") else "bare key"
        if sg.get("hardware_ids") is not None:
            kind = f"developer build signer for {len(sg['hardware_ids'])} hardware IDs"
        typer.echo(f"signer {sg['name']} added ({sg['alg']}, {kind}, key id {sg['key_id'][:16]}…)")


@signer_app.command("list")
def signer_list(as_json: JsonOpt = False) -> None:
    """List trusted signers."""
    with api() as client:
        rows = client.items("/signers")
    if as_json:
        print_json(rows)
        return
    print_table(
        "signers",
        ["name", "alg", "key id", "revoked", "created"],
        [
            [s["name"], s["alg"], s["key_id"][:16] + "…", short(s["revoked_at"]), short(s["created_at"])]
            for s in rows
        ],
    )


@signer_app.command("revoke")
def signer_revoke(name: Annotated[str, typer.Argument(metavar="NAME")], as_json: JsonOpt = False) -> None:
    """Stop trusting a signer: its manifests are refused, campaigns delivering one are cancelled."""
    with api() as client:
        sg = client.post(f"/signers/{name}/revoke")
    if as_json:
        print_json(sg)
    else:
        typer.echo(f"signer {sg['name']} revoked at {short(sg['revoked_at'])}")
