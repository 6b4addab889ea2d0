"""``fwcm device add|import|list|show|dead-letters``: devices registered directly with a tenant.

Claimed devices (``claim``, ``release``, ``transfer``, ``outdated``) are in ``fwcm.cli.inventory``,
added to ``device_app`` by ``fwcm.cli.main``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fwcm.cli.common import JsonOpt, api, parse_tags, print_fields, print_json, print_table, short

device_app = typer.Typer(help="Devices of the tenant.", no_args_is_help=True)


@device_app.command("add")
def device_add(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    vendor_id: Annotated[str, typer.Option("--vendor-id", help="Vendor UUID")],
    class_id: Annotated[str, typer.Option("--class-id", help="Class UUID")],
    tag: Annotated[list[str] | None, typer.Option("--tag", help="KEY=VALUE (repeatable)")] = None,
    sequence: Annotated[int, typer.Option(help="Installed manifest sequence number")] = 0,
    version: Annotated[str | None, typer.Option(help="Installed firmware version label")] = None,
    transport: Annotated[str, typer.Option(help="mqtt or coap")] = "mqtt",
    hardware_id: Annotated[str | None, typer.Option("--hardware-id")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a device; prints its secret and MQTT credentials once (provision them onto it)."""
    body = {
        "name": name,
        "vendor_id": vendor_id,
        "class_id": class_id,
        "tags": parse_tags(tag or []),
        "sequence": sequence,
        "version": version,
        "transport": transport,
        "hardware_id": hardware_id,
    }
    with api() as client:
        d = client.post("/devices", body)
    if as_json:
        print_json(d)
    else:
        typer.echo(f"device {d['name']} registered; secret (shown once): {d['secret']}")
        typer.echo(f"MQTT username: {d['mqtt_username']}; password (shown once): {d['mqtt_password']}")


@device_app.command("import")
def device_import(
    file: Annotated[Path, typer.Argument(help="CSV with a header row", metavar="FILE.csv")],
    secrets_out: Annotated[
        Path | None,
        typer.Option(
            "--secrets-out", help="Write name,secret,mqtt_username,mqtt_password CSV here (mode 0600)"
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import devices from CSV, all or nothing.

    Header: name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret
    (name, vendor_id, class_id required; tags as k=v;k2=v2; empty secret = generated).
    """
    with api() as client:
        result = client.upload("/devices/import", file, "text/csv")
    if secrets_out is not None:
        lines = ["name,secret,mqtt_username,mqtt_password"] + [
            f"{d['name']},{d['secret']},{d['mqtt_username']},{d['mqtt_password']}" for d in result["devices"]
        ]
        fd = os.open(secrets_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
    if as_json:
        print_json(result)
    else:
        where = f"; secrets written to {secrets_out}" if secrets_out else ""
        typer.echo(f"imported {result['imported']} devices{where}")


@device_app.command("list")
def device_list(
    filter: Annotated[
        str, typer.Option("--filter", "-f", help='e.g. tag.region == "eu" and sequence < 8')
    ] = "",
    limit: Annotated[int, typer.Option(help="At most this many")] = 100,
    offset: Annotated[int, typer.Option(help="Skip this many")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """List devices, optionally through a filter."""
    with api() as client:
        page = client.get("/devices", filter=filter or None, limit=limit, offset=offset)
    if as_json:
        print_json(page)
        return
    items = page["items"]
    title = f"devices {offset + 1 if items else 0}-{offset + len(items)} of {page['total']}"
    print_table(
        title,
        ["name", "class", "sequence", "version", "transport", "tags", "online"],
        [
            [
                d["name"],
                d["class_id"],
                d["sequence"],
                d["version"],
                d["transport"],
                ";".join(f"{k}={v}" for k, v in sorted(d["tags"].items())),
                "yes" if d["online"] else "no",
            ]
            for d in items
        ],
    )


@device_app.command("show")
def device_show(name: Annotated[str, typer.Argument(metavar="NAME")], as_json: JsonOpt = False) -> None:
    """Show one device."""
    with api() as client:
        d = client.get(f"/devices/{name}")
    if as_json:
        print_json(d)
    else:
        print_fields(
            f"device {d['name']}",
            d,
            [
                "name",
                "vendor_id",
                "class_id",
                "tags",
                "sequence",
                "version",
                "transport",
                "hardware_id",
                "online",
                "last_seen",
                "created_at",
            ],
        )


@device_app.command("dead-letters")
def device_dead_letters(
    device: Annotated[str | None, typer.Option("--device", help="Only this device's")] = None,
    limit: Annotated[int, typer.Option(help="At most this many")] = 100,
    offset: Annotated[int, typer.Option(help="Skip this many")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Messages of your devices that failed to apply and were set aside, newest first."""
    with api() as client:
        page = client.get("/dead-letters", device=device, limit=limit, offset=offset)
    if as_json:
        print_json(page)
        return
    print_table(
        f"{page['total']} dead letters",
        ["at", "device", "transport", "reason", "error"],
        [[short(d["at"]), d["device"], d["transport"], d["reason"], d["error"]] for d in page["items"]],
    )
