"""``fwcm key …`` and ``fwcm audit``: the tenant's API keys and who did what with them.

Rotation without downtime: ``fwcm key create new --role admin``, switch the clients to the new
key (``fwcm login``), ``fwcm key revoke old``.  Managing keys needs an admin key.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

import typer

from fwcm.cli.common import JsonOpt, api, fail, print_json, print_table, short
from fwcm.roles import ROLES, parse_duration

key_app = typer.Typer(
    help="API keys of the tenant: several, named, each with a role (viewer, operator, admin).",
    no_args_is_help=True,
)


@key_app.command("create")
def key_create(
    name: Annotated[str, typer.Argument(help="Key name, unique among the tenant's keys", metavar="NAME")],
    role: Annotated[
        str,
        typer.Option(
            "--role",
            help="viewer (read-only), operator (payloads, manifests, devices, campaigns) or admin "
            "(also keys and signers)",
        ),
    ],
    expires: Annotated[
        str | None, typer.Option("--expires", help="Lifetime such as 90m, 12h, 30d or 8w (default: none)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key and print it once (the server keeps only its hash)."""
    if role not in ROLES:
        raise fail(f"unknown role {role!r}: use viewer, operator or admin")
    body: dict[str, Any] = {"name": name, "role": role}
    if expires is not None:
        try:
            body["expires_at"] = (datetime.now(UTC) + parse_duration(expires)).isoformat()
        except ValueError as exc:
            raise fail(str(exc)) from None
    with api() as client:
        made = client.post("/keys", body)
    if as_json:
        print_json(made)
        return
    until = f", expires {short(made['expires_at'])} UTC" if made.get("expires_at") else ""
    typer.echo(f"key {made['name']} created ({made['role']}{until}); store it now, it is not shown again:")
    typer.echo(made["key"])


@key_app.command("list")
def key_list(
    revoked: Annotated[bool, typer.Option("--revoked", help="Also list revoked keys.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List the tenant's API keys (names, roles, expiry, last use; never the keys themselves)."""
    with api() as client:
        keys = client.items("/keys", revoked=str(revoked).lower())
    if as_json:
        print_json(keys)
        return
    columns = ["name", "role", "created", "expires", "last used"] + (["revoked"] if revoked else [])
    rows = [
        [k["name"], k["role"], short(k["created_at"]), short(k["expires_at"]), short(k["last_used_at"])]
        + ([short(k["revoked_at"])] if revoked else [])
        for k in keys
    ]
    print_table("API keys", columns, rows)


@key_app.command("revoke")
def key_revoke(
    name: Annotated[str, typer.Argument(help="Name of the key to revoke", metavar="NAME")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke an API key: every request with it is refused from now on."""
    with api() as client:
        gone = client.request("DELETE", f"/keys/{quote(name, safe='')}").json()
    if as_json:
        print_json(gone)
    else:
        typer.echo(f"key {gone['name']} revoked")


def audit(
    since: Annotated[
        str | None, typer.Option("--since", help="Only entries at or after this time (RFC 3339)")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many")] = 100,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip this many newer entries")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Who did what: one page of the tenant's mutating API requests, newest first."""
    with api() as client:
        page = client.get("/audit", since=since, limit=limit, offset=offset)
    if as_json:
        print_json(page)
        return
    items = page["items"]
    print_table(
        f"audit log {offset + 1 if items else 0}-{offset + len(items)} of {page['total']}",
        ["time", "key", "role", "action", "object", "status", "source"],
        [
            [
                short(e["at"]),
                e["key"],
                e["role"],
                e["action"],
                " ".join(f"{k}={v}" for k, v in e["object"].items()),
                e["status"],
                e["source"],
            ]
            for e in page["items"]
        ],
    )
