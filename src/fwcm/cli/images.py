"""Firmware payloads and signed manifests on the server: ``fwcm payload …`` and
``fwcm manifest upload|list`` (registered on ``fwcm.cli.manifest.app`` by ``fwcm.cli.main``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fwcm.cli.common import JsonOpt, api, print_fields, print_json, print_table, short

payload_app = typer.Typer(help="Firmware payloads on the server.", no_args_is_help=True)


@payload_app.command("upload")
def payload_upload(
    file: Annotated[Path, typer.Argument(help="Firmware image", metavar="FILE")],
    name: Annotated[str | None, typer.Option(help="Label (defaults to the file name)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a firmware image; it is stored by its SHA-256 (uploading twice is harmless)."""
    with api() as client:
        p = client.upload("/payloads", file, "application/octet-stream", name=name or file.name)
    if as_json:
        print_json(p)
    else:
        verb = "uploaded" if p.get("created") else "already stored"
        typer.echo(f"{verb}: {p['sha256']} ({p['size']} bytes); devices fetch it at {client.url}{p['url']}")


@payload_app.command("list")
def payload_list(as_json: JsonOpt = False) -> None:
    """List the tenant's payloads."""
    with api() as client:
        rows = client.items("/payloads")
    if as_json:
        print_json(rows)
        return
    print_table(
        "payloads",
        ["sha256", "size", "name", "created"],
        [[p["sha256"], p["size"], p["name"], short(p["created_at"])] for p in rows],
    )


@payload_app.command("show")
def payload_show(sha256: Annotated[str, typer.Argument(metavar="SHA256")], as_json: JsonOpt = False) -> None:
    """Show one payload."""
    with api() as client:
        p = client.get(f"/payloads/{sha256}")
    if as_json:
        print_json(p)
    else:
        print_fields(f"payload {p['sha256'][:12]}…", p, ["sha256", "size", "name", "url", "created_at"])


@payload_app.command("delete")
def payload_delete(sha256: Annotated[str, typer.Argument(metavar="SHA256")]) -> None:
    """Delete a payload no manifest of the tenant describes."""
    with api() as client:
        client.delete(f"/payloads/{sha256}")
    typer.echo(f"payload {sha256} deleted")


def manifest_delete(manifest_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
    """Delete a manifest no campaign uses."""
    with api() as client:
        client.delete(f"/manifests/{manifest_id}")
    typer.echo(f"manifest {manifest_id} deleted")


def manifest_upload(
    file: Annotated[
        Path, typer.Argument(help="Signed SUIT envelope (from `fwcm manifest create`)", metavar="FILE")
    ],
    name: Annotated[str | None, typer.Option(help="Label (defaults to the file name)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a signed manifest; the server checks it against the tenant's signers."""
    with api() as client:
        m = client.upload("/manifests", file, "application/cbor", name=name or file.name)
    if as_json:
        print_json(m)
    else:
        verb = "uploaded" if m.get("created") else "already stored"
        typer.echo(f"{verb}: manifest {m['id']} (sequence {m['sequence']}, signed by {m['signer']})")


def manifest_list(as_json: JsonOpt = False) -> None:
    """List the tenant's manifests."""
    with api() as client:
        rows = client.items("/manifests")
    if as_json:
        print_json(rows)
        return
    print_table(
        "manifests",
        ["id", "sequence", "class", "image", "signer", "name", "created"],
        [
            [
                m["id"],
                m["sequence"],
                m["class_id"],
                m["image_digest"][:12] + "…",
                m["signer"],
                m["name"],
                short(m["created_at"]),
            ]
            for m in rows
        ],
    )
