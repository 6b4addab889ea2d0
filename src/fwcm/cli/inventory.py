"""Client commands for claim-once ownership.

``fwcm factory register|list|make-batch`` for manufacturers, and ``fwcm device
claim|release|transfer|outdated`` for fleet tenants (registered on ``devices.device_app`` by
``fwcm.cli.main``).  Like every client command: ``--json`` for scripts, one ``error:`` line and
exit code 1 on failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fwcm import inventory
from fwcm.cli.common import JsonOpt, api, fail, parse_tags, print_json, print_table, short

factory_app = typer.Typer(
    help="Manufacturers: register devices for fleet tenants to claim.", no_args_is_help=True
)


# -- factory ----------------------------------------------------------------------------------


@factory_app.command("register")
def factory_register(
    file: Annotated[
        Path, typer.Argument(help="factory.csv (from `fwcm factory make-batch`)", metavar="FILE.csv")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Register a batch of devices, all or nothing (manufacturer tenants only).

    Header: serial,hardware_id,vendor,model,firmware_version,sequence,claim_hash,secret,attest_key_pem
    """
    content_type = "application/json" if file.suffix.lower() == ".json" else "text/csv"
    with api() as client:
        result = client.upload("/factory/devices", file, content_type)
    if as_json:
        print_json(result)
    else:
        typer.echo(f"registered {result['registered']} devices")


@factory_app.command("list")
def factory_list(
    claimed: Annotated[
        bool | None, typer.Option("--claimed/--unclaimed", help="Only claimed or only unclaimed devices")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many")] = 100,
    offset: Annotated[int, typer.Option(help="Skip this many")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """List the manufacturer's devices and whether each has been claimed."""
    with api() as client:
        flag = None if claimed is None else str(claimed).lower()
        page = client.get("/factory/devices", claimed=flag, limit=limit, offset=offset)
    if as_json:
        print_json(page)
        return
    items = page["items"]
    print_table(
        f"factory devices {offset + 1 if items else 0}-{offset + len(items)} of {page['total']}",
        ["serial", "hardware id", "class", "version", "sequence", "claimed", "claimed at"],
        [
            [
                f["serial"],
                f["hardware_id"],
                f["class_id"],
                f["firmware_version"],
                f["sequence"],
                "yes" if f["claimed"] else "no",
                short(f["claimed_at"]),
            ]
            for f in items
        ],
    )


@factory_app.command("make-batch")
def factory_make_batch(
    count: Annotated[int, typer.Option("--count", min=1, help="Number of devices")],
    vendor: Annotated[str, typer.Option("--vendor", help="Vendor domain, e.g. example.com")],
    model: Annotated[str, typer.Option("--model", help="Device model, e.g. sensor-a")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the batch into")],
    firmware_version: Annotated[str, typer.Option("--firmware-version", help="Factory firmware")] = "1.0.0",
    sequence: Annotated[int, typer.Option(min=0, help="Manifest sequence of the factory firmware")] = 0,
    serial_prefix: Annotated[str, typer.Option("--serial-prefix", help="Serials: PREFIX-BATCH-NNNNN")] = "SN",
    as_json: JsonOpt = False,
) -> None:
    """Make a factory batch locally: factory.csv (upload), labels.csv (boxes), devices/*.json (flash).

    Claim codes appear only in labels.csv; attestation private keys and secrets only in the device
    files (and secrets in factory.csv); all three are written with mode 0600.
    """
    try:
        units = inventory.make_batch(
            count,
            vendor,
            model,
            firmware_version=firmware_version,
            sequence=sequence,
            serial_prefix=serial_prefix,
        )
        paths = inventory.write_batch(units, out)
    except ValueError as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"cannot write batch to {out}: {exc.strerror or exc}") from None
    if as_json:
        print_json(
            {
                "count": len(units),
                "factory_csv": str(paths["factory"]),
                "labels_csv": str(paths["labels"]),
                "devices_dir": str(paths["devices"]),
                "serials": [u.serial for u in units],
            }
        )
    else:
        typer.echo(
            f"made {len(units)} devices ({units[0].serial} … {units[-1].serial}); "
            f"upload {paths['factory']} with `fwcm factory register`; "
            f"claim codes in {paths['labels']}; device files in {paths['devices']}"
        )


# -- fleet: claim, release, transfer, outdated ------------------------------------------------


def device_claim(
    serial: Annotated[str, typer.Argument(metavar="SERIAL")],
    claim_code: Annotated[str, typer.Argument(metavar="CLAIM_CODE", help="As printed on the box")],
    name: Annotated[str | None, typer.Option(help="Device name (default: the serial)")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="KEY=VALUE (repeatable)")] = None,
    transport: Annotated[str, typer.Option(help="mqtt, coap or lwm2m")] = "mqtt",
    as_json: JsonOpt = False,
) -> None:
    """Claim a manufacturer's device with its serial and claim code (``--json`` also shows its MQTT
    username and password; the device can derive both, see docs/protocol.md)."""
    body = {
        "serial": serial,
        "claim_code": claim_code,
        "name": name,
        "tags": parse_tags(tag or []),
        "transport": transport,
    }
    with api() as client:
        d = client.post("/devices/claim", body)
    if as_json:
        print_json(d)
    else:
        typer.echo(f"claimed {d['serial']} as device {d['name']} of tenant {d['tenant']}")


def device_release(name: Annotated[str, typer.Argument(metavar="NAME")], as_json: JsonOpt = False) -> None:
    """Give up a claimed device; its claim code works again for the next owner."""
    with api() as client:
        r = client.post(f"/devices/{name}/release")
    if as_json:
        print_json(r)
    else:
        typer.echo(f"released device {name} (serial {r['serial']})")


def device_transfer(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    to: Annotated[str, typer.Option("--to", help="Slug of the receiving fleet tenant")],
    new_name: Annotated[
        str | None, typer.Option("--name", help="Name in the receiving tenant (default: unchanged)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Move a claimed device to another fleet tenant."""
    with api() as client:
        d = client.post(f"/devices/{name}/transfer", {"to": to, "name": new_name})
    if as_json:
        print_json(d)
    else:
        typer.echo(f"device {name} (serial {d['serial']}) now belongs to {d['tenant']} as {d['name']}")


def device_outdated(
    filter: Annotated[str, typer.Option("--filter", "-f", help="Only devices matching this filter")] = "",
    limit: Annotated[int, typer.Option(help="At most this many")] = 1000,
    offset: Annotated[int, typer.Option(help="Skip this many")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Devices for which a newer manifest of their class exists."""
    with api() as client:
        page = client.get("/devices/outdated", filter=filter or None, limit=limit, offset=offset)
    if as_json:
        print_json(page)
        return
    print_table(
        f"{page['total']} outdated devices",
        ["device", "version", "sequence", "firmware", "newest manifest", "newest sequence", "newest name"],
        [
            [
                r["device"],
                r["version"],
                r["sequence"],
                r["firmware_name"],
                r["newest_manifest_id"],
                r["newest_sequence"],
                r["newest_name"],
            ]
            for r in page["items"]
        ],
    )
