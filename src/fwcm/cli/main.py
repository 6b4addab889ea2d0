"""The ``fwcm`` command: local tools (keys, manifests), API client commands, server and demo."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from importlib import metadata
from typing import Annotated

import typer

from fwcm.cli import account, campaigns, devices, images, inventory, keys, manifest, pki, signers, watch
from fwcm.cli.apikeys import key_app
from fwcm.cli.conformance import conformance_command
from fwcm.cli.demo import demo
from fwcm.cli.signing import audit_app, ca_app, release_app
from fwcm.cli.webhooks import webhook_app
from fwcm.runtime import setup_logging, tune_gc

app = typer.Typer(
    help="fwcm: firmware campaign manager for IoT fleets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(keys.app, name="keys", help="Manifest signing keys (local files; API keys: `fwcm key`).")
app.add_typer(pki.app, name="pki", help="Certificates: operator root, tenant CAs, signers.")
manifest.app.command("upload", help="Upload a signed manifest to the server.")(images.manifest_upload)
manifest.app.command("list", help="List the tenant's manifests.")(images.manifest_list)
manifest.app.command("delete", help="Delete a manifest no campaign uses.")(images.manifest_delete)
app.add_typer(manifest.app, name="manifest", help="SUIT manifests: create, inspect, verify, upload.")
app.add_typer(images.payload_app, name="payload", help="Firmware payloads on the server.")
app.add_typer(signers.signer_app, name="signer", help="Public keys the tenant trusts.")
devices.device_app.command("claim")(inventory.device_claim)
devices.device_app.command("release")(inventory.device_release)
devices.device_app.command("transfer")(inventory.device_transfer)
devices.device_app.command("outdated")(inventory.device_outdated)
app.add_typer(devices.device_app, name="device", help="Devices of the tenant.")
app.add_typer(inventory.factory_app, name="factory", help="Manufacturers: devices for fleets to claim.")
campaigns.campaign_app.command("watch")(watch.watch)
app.add_typer(campaigns.campaign_app, name="campaign", help="Campaigns: create, start, watch.")
app.add_typer(campaigns.accounting_app, name="accounting", help="Usage reported by installed software.")
app.add_typer(webhook_app, name="webhook", help="URLs that receive the tenant's signed events.")
app.command("login", help="Store the server URL and API key in the config file.")(account.login)
app.add_typer(key_app, name="key", help="API keys of the tenant: create, list, revoke.")
app.add_typer(
    audit_app, name="audit", help="Who did what: the tenant's audit log; `verify` checks its chain."
)
app.add_typer(ca_app, name="ca", help="The tenant CA whose key the server holds (HSM).")
app.add_typer(release_app, name="release", help="Manifests signed by the server after their approvals.")
app.command("demo", help="Run a whole campaign on embedded defaults with a simulated fleet.")(demo)
app.command("conformance", help="Play the server against one device and check it follows the protocol.")(
    conformance_command
)


def _print_version(value: bool) -> None:
    """``fwcm --version``: the installed package's version (its metadata, not a copy in the code)."""
    if value:
        typer.echo(f"fwcm {metadata.version('fwcm')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """fwcm: firmware campaign manager for IoT fleets."""


admin_app = typer.Typer(help="Server-side administration (runs against the database directly).")
app.add_typer(admin_app, name="admin")


def _setup_logging(verbose: bool) -> None:
    setup_logging(logging.DEBUG if verbose else logging.INFO)


@admin_app.command("tenant-ca")
def tenant_ca(
    slug: Annotated[str, typer.Argument(help="Tenant slug")],
    cert: Annotated[str, typer.Argument(help="Tenant CA certificate PEM (from `fwcm pki tenant-ca`)")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Register the CA certificate the operator issued to a tenant (checked against FWCM_PKI_ROOT)."""
    from pathlib import Path

    from fwcm import pki as pki_lib
    from fwcm.config import Settings
    from fwcm.errors import NotFound
    from fwcm.store import trust
    from fwcm.store.db import Database

    settings = Settings.from_env()
    root = settings.root_cert()
    if root is None:
        typer.echo("error: set FWCM_PKI_ROOT to the operator root certificate first", err=True)
        raise typer.Exit(1)
    db = Database(settings.database_url)
    db.migrate()
    try:
        with db.session() as s:
            trust.set_tenant_ca(s, slug, Path(cert).read_bytes(), root)
    except (OSError, pki_lib.ChainError, NotFound) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        db.dispose()
    if as_json:
        typer.echo(json.dumps({"tenant": slug, "ca": cert}))
    else:
        typer.echo(f"tenant {slug}: CA registered")


@admin_app.command("tenant-create")
def tenant_create(
    slug: Annotated[str, typer.Argument(help="Short tenant id used in topics and paths, e.g. acme")],
    name: Annotated[str | None, typer.Option(help="Display name")] = None,
    kind: Annotated[
        str, typer.Option(help="fleet (owns devices and campaigns) or manufacturer (registers devices)")
    ] = "fleet",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Create a tenant and print its API key (shown once; only its hash is stored)."""
    from fwcm.config import Settings
    from fwcm.store import tenants
    from fwcm.store.db import Database

    settings = Settings.from_env()
    settings.ensure_dirs()
    db = Database(settings.database_url)
    db.migrate()
    try:
        with db.session() as s:
            tenant, key = tenants.create_tenant(s, slug, name or slug, kind)
            tenant_slug = tenant.slug
    except Exception as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        db.dispose()
    if as_json:
        typer.echo(json.dumps({"tenant": tenant_slug, "kind": kind, "api_key": key}))
    else:
        typer.echo(f"tenant {tenant_slug} created; API key (store it now, it is not shown again):\n{key}")


@admin_app.command("tenant-key")
def tenant_key(
    slug: Annotated[str, typer.Argument(help="Tenant slug")],
    name: Annotated[str, typer.Argument(help="Key name, unique among the tenant's keys")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin")] = "admin",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Make an API key for an existing tenant and print it once: the way back in when its admin
    keys have expired or are lost."""
    from fwcm.config import Settings
    from fwcm.roles import Role
    from fwcm.store import tenants
    from fwcm.store.db import Database

    settings = Settings.from_env()
    db = Database(settings.database_url)
    db.migrate()
    try:
        with db.session() as s:
            tenant = tenants.tenant_by_slug(s, slug)
            if tenant is None:
                raise ValueError(f"no tenant {slug!r}")
            _row, key = tenants.create_key(s, tenant.id, name, Role.parse(role).label)
    except Exception as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        db.dispose()
    if as_json:
        typer.echo(json.dumps({"tenant": slug, "name": name, "role": role, "api_key": key}))
    else:
        typer.echo(
            f"key {name} ({role}) of tenant {slug} created; store it now, it is not shown again:\n{key}"
        )


@admin_app.command("migrate")
def migrate() -> None:
    """Bring the database schema to the newest revision."""
    from fwcm.config import Settings
    from fwcm.store.db import Database

    settings = Settings.from_env()
    settings.ensure_dirs()
    db = Database(settings.database_url)
    db.migrate()
    db.dispose()
    typer.echo("database schema is current")


@app.command("server")
def server(
    mqtt: Annotated[str | None, typer.Option(help="Broker URL (default $FWCM_MQTT_URL)")] = None,
    no_mqtt: Annotated[bool, typer.Option("--no-mqtt", help="Serve CoAP and HTTP only")] = False,
    no_coap: Annotated[bool, typer.Option("--no-coap", help="Serve MQTT and HTTP only")] = False,
    replica: Annotated[str | None, typer.Option(help="Replica name (MQTT client id, lease owner)")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run one server replica (REST API, MQTT, CoAP, engine) until SIGINT/SIGTERM."""
    from fwcm.config import Settings
    from fwcm.server.app import Server

    _setup_logging(verbose)
    tune_gc()
    overrides: dict[str, object] = {}
    if mqtt:
        overrides["mqtt_url"] = mqtt
    settings = Settings.from_env(**overrides)
    srv = Server(settings, replica=replica or "", enable_mqtt=not no_mqtt, enable_coap=not no_coap)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await srv.start()
        logging.getLogger("fwcm").info(
            "serving: http://%s:%d  coap://%s:%d  mqtt %s",
            settings.http_host,
            settings.http_port,
            settings.coap_host,
            settings.coap_port,
            "off" if no_mqtt else settings.mqtt_url.split("@")[-1],
        )
        await stop.wait()
        await srv.stop()

    try:
        asyncio.run(main())
    except (ConnectionError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def run() -> None:  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
