"""``fwcm conformance``: check one device's firmware against fwcm's device protocol.

The command plays the server for the device under test (see :mod:`fwcm.conformance`), prints a
pass/fail table (or JSON) and exits 1 when any scenario failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path
from typing import Annotated

import aiomqtt
import typer
from rich.console import Console
from rich.table import Table

from fwcm import conformance, manifest
from fwcm.cli.common import fail
from fwcm.cli.manifest import resolve_ids
from fwcm.conformance import Device, KitSettings, Verdict
from fwcm.protocol import NAME_RE

log = logging.getLogger(__name__)


def _host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise typer.BadParameter(f"{what} must look like HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _secret(value: str) -> bytes:
    try:
        secret = bytes.fromhex(value)
    except ValueError:
        raise typer.BadParameter("--secret must be the device secret in hex") from None
    if not 16 <= len(secret) <= 64:
        raise typer.BadParameter("--secret must be 16 to 64 bytes (fwcm makes 32)")
    return secret


def _name(value: str, what: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise typer.BadParameter(f"{what} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}")
    return value


def _print_table(verdicts: list[Verdict]) -> None:
    table = Table(title="fwcm conformance")
    table.add_column("scenario")
    table.add_column("result")
    table.add_column("what the device did")
    for v in verdicts:
        table.add_row(v.scenario, "[green]pass[/]" if v.passed else "[red]FAIL[/]", v.detail)
    console = Console()
    console.print(table)
    failed = [v.scenario for v in verdicts if not v.passed]
    console.print(f"failed: {', '.join(failed)}" if failed else f"all {len(verdicts)} scenarios passed")


def conformance_command(
    tenant: Annotated[str, typer.Option("--tenant", help="The device's tenant slug.")],
    device: Annotated[str, typer.Option("--device", help="The device's name.")],
    secret: Annotated[
        str,
        typer.Option(
            "--secret",
            envvar="FWCM_DEVICE_SECRET",
            help="The device secret, hex (as registration returned it).",
        ),
    ],
    signing_key: Annotated[
        Path,
        typer.Option(
            "--signing-key", help="PEM private key whose public half the device trusts for manifests."
        ),
    ],
    transport: Annotated[str, typer.Option("--transport", help="mqtt or coap.")] = "mqtt",
    broker: Annotated[
        str,
        typer.Option(
            "--broker",
            envvar="FWCM_MQTT_URL",
            help="MQTT: mqtt[s]://user:pass@host:port of an account that may publish the device's notice "
            "topic and read its status topic (fwcm's service account).",
        ),
    ] = "mqtt://127.0.0.1:1883",
    coap_bind: Annotated[
        str, typer.Option("--coap-bind", help="CoAP: where the kit serves /n, /s and /p for the device.")
    ] = "127.0.0.1:5683",
    http_bind: Annotated[
        str,
        typer.Option("--http-bind", help="Where the kit serves payloads over HTTP (port 0: any free one)."),
    ] = "127.0.0.1:0",
    public_host: Annotated[
        str | None,
        typer.Option(
            "--public-host", help="Host name the device reaches the kit at (default: the bind host)."
        ),
    ] = None,
    vendor_id: Annotated[
        uuid.UUID | None, typer.Option("--vendor-id", help="The device's vendor ID (UUID).")
    ] = None,
    vendor_domain: Annotated[
        str | None,
        typer.Option("--vendor-domain", help="Derive the vendor ID: uuid5(NAMESPACE_DNS, DOMAIN)."),
    ] = None,
    class_id: Annotated[
        uuid.UUID | None, typer.Option("--class-id", help="The device's class ID (UUID).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Derive the class ID: uuid5(vendor ID, MODEL).")
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Run only this scenario (repeatable; hello always runs)."),
    ] = None,
    image_size: Annotated[int, typer.Option("--image-size", min=4096, max=16 * 1024 * 1024)] = 48 * 1024,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, max=3600, help="Seconds per scenario.")
    ] = 60.0,
    quiet: Annotated[
        float,
        typer.Option(
            "--quiet",
            min=0.1,
            max=60,
            help="Seconds the device must stay silent after a notice it must ignore.",
        ),
    ] = 2.0,
    hello_timeout: Annotated[
        float,
        typer.Option(
            "--hello-timeout", min=1, max=3600, help="Seconds to wait for the device's first hello."
        ),
    ] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdicts as JSON.")] = False,
) -> None:
    """Play the fwcm server against ONE device and check how it handles updates, refusals, cancel,
    broken transfers and forged or replayed notices. Start (or restart) the device once the kit
    listens: the kit waits for its hello. Exits 1 when any scenario fails."""
    if transport not in ("mqtt", "coap"):
        raise typer.BadParameter("--transport must be mqtt or coap")
    unknown = sorted(set(only or []) - set(conformance.SCENARIOS))
    if unknown:
        raise typer.BadParameter(
            f"unknown scenario {', '.join(unknown)}; choose from {', '.join(conformance.SCENARIOS)}"
        )
    try:
        key = manifest.load_private_key(signing_key.read_bytes())
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"--signing-key: {exc}") from None
    vendor, klass = resolve_ids(vendor_id, vendor_domain, class_id, model)
    settings = KitSettings(
        device=Device(_name(tenant, "--tenant"), _name(device, "--device"), _secret(secret)),
        transport="coap" if transport == "coap" else "mqtt",
        vendor_id=vendor,
        class_id=klass,
        signing_key=key,
        mqtt_url=broker,
        coap_bind=_host_port(coap_bind, "--coap-bind"),
        http_bind=_host_port(http_bind, "--http-bind"),
        public_host=public_host,
        image_size=image_size,
        timeout=timeout,
        quiet=quiet,
        hello_timeout=hello_timeout,
    )
    where = broker.rsplit("@", 1)[-1] if transport == "mqtt" else f"coap://{coap_bind}"
    message = f"listening: start or restart {tenant}/{device} now (the kit waits for its hello over {where})"
    try:
        verdicts = asyncio.run(
            conformance.run(settings, only, listening=lambda: typer.echo(message, err=True))
        )
    except (aiomqtt.MqttError, OSError) as exc:
        raise fail(f"cannot serve the device: {exc}") from None
    if as_json:
        failed = [v.scenario for v in verdicts if not v.passed]
        typer.echo(
            json.dumps(
                {"passed": not failed, "failed": failed, "scenarios": [v.to_json() for v in verdicts]},
                indent=2,
            )
        )
    else:
        _print_table(verdicts)
    if not conformance.all_passed(verdicts):
        raise typer.Exit(1)
