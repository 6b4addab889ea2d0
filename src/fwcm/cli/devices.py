"""``fwcm device add|import|list|show|update|retag|decommission|delete|events|dead-letters``:
devices registered directly with a tenant.

Claimed devices (``claim``, ``release``, ``transfer``, ``outdated``) are in ``fwcm.cli.inventory``,
added to ``device_app`` by ``fwcm.cli.main``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fwcm.cli.common import JsonOpt, api, fail, parse_tags, print_fields, print_json, print_table, short

device_app = typer.Typer(help="Devices of the tenant.", no_args_is_help=True)


@device_app.command("add")
def device_add(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    vendor_id: Annotated[str, typer.Option("--vendor-id", help="Vendor UUID")],
    class_id: Annotated[str, typer.Option("--class-id", help="Class UUID")],
    tag: Annotated[list[str] | None, typer.Option("--tag", help="KEY=VALUE (repeatable)")] = None,
    sequence: Annotated[int, typer.Option(help="Installed manifest sequence number")] = 0,
    version: Annotated[str | None, typer.Option(help="Installed firmware version label")] = None,
    transport: Annotated[str, typer.Option(help="mqtt, coap or lwm2m")] = "mqtt",
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


TagOpt = Annotated[list[str] | None, typer.Option("--tag", help="Set KEY=VALUE (repeatable)")]
UntagOpt = Annotated[list[str] | None, typer.Option("--untag", help="Remove tag KEY (repeatable)")]


def _tag_patch(tag: list[str] | None, untag: list[str] | None) -> dict[str, str | None]:
    """``--tag k=v`` and ``--untag k`` as the JSON merge patch the API takes."""
    patch: dict[str, str | None] = dict(parse_tags(tag or []))
    for key in untag or []:
        if key in patch:
            raise fail(f"tag {key!r} is both set and removed")
        patch[key] = None
    return patch


@device_app.command("update")
def device_update(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    tag: TagOpt = None,
    untag: UntagOpt = None,
    version: Annotated[str | None, typer.Option(help="Installed firmware version label")] = None,
    hardware_id: Annotated[str | None, typer.Option("--hardware-id")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a device's tags (--tag k=v sets, --untag k removes), version or hardware id."""
    body: dict[str, object] = {}
    patch = _tag_patch(tag, untag)
    if patch:
        body["tags"] = patch
    if version is not None:
        body["version"] = version
    if hardware_id is not None:
        body["hardware_id"] = hardware_id
    if not body:
        raise fail("nothing to change: give --tag, --untag, --version or --hardware-id")
    with api() as client:
        d = client.patch(f"/devices/{name}", body)
    if as_json:
        print_json(d)
    else:
        tags = ";".join(f"{k}={v}" for k, v in sorted(d["tags"].items())) or "no tags"
        typer.echo(f"device {d['name']} updated: {tags}")


@device_app.command("retag")
def device_retag(
    filter: Annotated[
        str, typer.Option("--filter", "-f", help='Devices to change, e.g. tag.region == "eu" ("" = all)')
    ],
    tag: TagOpt = None,
    untag: UntagOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set or remove tags on every device a filter selects (preview with device list --filter)."""
    patch = _tag_patch(tag, untag)
    if not patch:
        raise fail("nothing to change: give --tag or --untag")
    with api() as client:
        out = client.post("/devices/retag", {"filter": filter, "tags": patch})
    if as_json:
        print_json(out)
    else:
        typer.echo(f"retagged {out['matched']} devices")


@device_app.command("decommission")
def device_decommission(
    name: Annotated[str, typer.Argument(metavar="NAME")], as_json: JsonOpt = False
) -> None:
    """Take a device out of service: no broker account or payload access, its notices withdrawn,
    its reports refused, no campaign takes it in.  It stays listed until deleted."""
    with api() as client:
        out = client.post(f"/devices/{name}/decommission")
    if as_json:
        print_json(out)
    else:
        typer.echo(f"device {name} decommissioned; {out['withdrawn']} deployments withdrawn")


@device_app.command("delete")
def device_delete(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    force: Annotated[bool, typer.Option("--force", help="Also a device in service")] = False,
) -> None:
    """Delete a decommissioned device with its history (--force: one in service, too)."""
    with api() as client:
        client.delete(f"/devices/{name}", force="true" if force else None)
    typer.echo(f"device {name} deleted")


@device_app.command("events")
def device_events(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    limit: Annotated[int, typer.Option(help="At most this many")] = 50,
    offset: Annotated[int, typer.Option(help="Skip this many newer ones")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """A device's history: one page of its deployment state changes, newest first."""
    with api() as client:
        page = client.get(f"/devices/{name}/events", limit=limit, offset=offset)
    rows = page["items"]
    if as_json:
        print_json(rows)
        return
    print_table(
        f"device {name}: events {offset + 1 if rows else 0}-{offset + len(rows)} of {page['total']}",
        ["at", "campaign", "state", "result", "detail"],
        [[short(e["at"]), e["campaign_id"], e["state"], e["result"], e["detail"] or ""] for e in rows],
    )
