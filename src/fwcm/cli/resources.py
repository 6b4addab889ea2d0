"""Client commands over the management API: payloads, signers, manifests, devices, campaigns.

Each command talks to the server through ``ApiClient``; every read command takes ``--json`` for
scripts and otherwise prints a rich table.  Errors are one ``error: …`` line and exit code 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fwcm.cli.client import ApiClient, ApiError, load_config, save_config
from fwcm.rollout.definition import DefinitionError, load_definition

make_client: Callable[[], ApiClient] = ApiClient.from_env
"""How commands obtain a client (the environment and config file by default)."""

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

payload_app = typer.Typer(help="Firmware payloads on the server.", no_args_is_help=True)
signer_app = typer.Typer(help="Public keys the tenant trusts to sign manifests.", no_args_is_help=True)
device_app = typer.Typer(help="Devices of the tenant.", no_args_is_help=True)
accounting_app = typer.Typer(help="Usage reported by installed software.", no_args_is_help=True)
campaign_app = typer.Typer(
    help="Campaigns: a manifest rolled out to a filtered set of devices.", no_args_is_help=True
)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@contextmanager
def api() -> Iterator[ApiClient]:
    """A client for one command; any ApiError ends the command with one error line."""
    try:
        client = make_client()
        with client:
            yield client
    except ApiError as exc:
        raise _fail(str(exc)) from None


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def _table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*["" if v is None else str(v) for v in r])
    _console().print(table)


def _fields(title: str, data: dict[str, Any], keys: list[str]) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for k in keys:
        v = data.get(k)
        if isinstance(v, (dict, list)):
            v = json.dumps(v) if v else ""
        table.add_row(k, "" if v is None else str(v))
    _console().print(table)


def _short(ts: str | None) -> str:
    return (ts or "")[:19].replace("T", " ")


# -- login ------------------------------------------------------------------------------------


def login(
    url: Annotated[str, typer.Option(help="Server base URL, e.g. http://127.0.0.1:8080")],
    api_key: Annotated[str, typer.Option("--api-key", help="The tenant's API key (fwcm_…)")],
    check: Annotated[bool, typer.Option(help="Verify the key against the server first.")] = True,
) -> None:
    """Store the server URL and API key in the config file (mode 0600)."""
    if check:
        try:
            with ApiClient(url, api_key) as client:
                tenant = client.get("/tenant")
        except ApiError as exc:
            raise _fail(f"login refused: {exc}") from None
        who = f" as tenant {tenant['slug']}"
    else:
        who = ""
    path = save_config(url, api_key)
    typer.echo(f"logged in to {url.rstrip('/')}{who}; settings saved in {path}")


def whoami(as_json: JsonOpt = False) -> None:
    """Show the server and tenant the client commands use."""
    with api() as client:
        tenant = client.get("/tenant")
    if as_json:
        _print_json({"url": load_config().url, **tenant})
    else:
        typer.echo(f"{tenant['slug']} ({tenant['name']}) at {client.url}")


# -- payloads ---------------------------------------------------------------------------------


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
        _print_json(p)
    else:
        verb = "uploaded" if p.get("created") else "already stored"
        typer.echo(f"{verb}: {p['sha256']} ({p['size']} bytes); devices fetch it at {client.url}{p['url']}")


@payload_app.command("list")
def payload_list(as_json: JsonOpt = False) -> None:
    """List the tenant's payloads."""
    with api() as client:
        rows = client.get("/payloads")
    if as_json:
        _print_json(rows)
        return
    _table(
        "payloads",
        ["sha256", "size", "name", "created"],
        [[p["sha256"], p["size"], p["name"], _short(p["created_at"])] for p in rows],
    )


@payload_app.command("show")
def payload_show(sha256: Annotated[str, typer.Argument(metavar="SHA256")], as_json: JsonOpt = False) -> None:
    """Show one payload."""
    with api() as client:
        p = client.get(f"/payloads/{sha256}")
    if as_json:
        _print_json(p)
    else:
        _fields(f"payload {p['sha256'][:12]}…", p, ["sha256", "size", "name", "url", "created_at"])


# -- signers ----------------------------------------------------------------------------------


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
        raise _fail("give exactly one of --key or --cert")
    path = key or cert
    assert path is not None
    try:
        pem = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"cannot read {path}: {exc}") from None
    body = {"name": name, "public_key_pem": pem} if key else {"name": name, "cert_pem": pem}
    with api() as client:
        sg = client.post("/signers", body)
    if as_json:
        _print_json(sg)
    else:
        kind = "certified" if sg.get("certified") else "bare key"
        if sg.get("hardware_ids") is not None:
            kind = f"developer build signer for {len(sg['hardware_ids'])} hardware IDs"
        typer.echo(f"signer {sg['name']} added ({sg['alg']}, {kind}, key id {sg['key_id'][:16]}…)")


@signer_app.command("list")
def signer_list(as_json: JsonOpt = False) -> None:
    """List trusted signers."""
    with api() as client:
        rows = client.get("/signers")
    if as_json:
        _print_json(rows)
        return
    _table(
        "signers",
        ["name", "alg", "key id", "revoked", "created"],
        [
            [s["name"], s["alg"], s["key_id"][:16] + "…", _short(s["revoked_at"]), _short(s["created_at"])]
            for s in rows
        ],
    )


@signer_app.command("revoke")
def signer_revoke(name: Annotated[str, typer.Argument(metavar="NAME")], as_json: JsonOpt = False) -> None:
    """Stop trusting a signer: its manifests are refused, campaigns delivering one are cancelled."""
    with api() as client:
        sg = client.post(f"/signers/{name}/revoke")
    if as_json:
        _print_json(sg)
    else:
        typer.echo(f"signer {sg['name']} revoked at {_short(sg['revoked_at'])}")


# -- manifests --------------------------------------------------------------------------------


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
        _print_json(m)
    else:
        verb = "uploaded" if m.get("created") else "already stored"
        typer.echo(f"{verb}: manifest {m['id']} (sequence {m['sequence']}, signed by {m['signer']})")


def manifest_list(as_json: JsonOpt = False) -> None:
    """List the tenant's manifests."""
    with api() as client:
        rows = client.get("/manifests")
    if as_json:
        _print_json(rows)
        return
    _table(
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
                _short(m["created_at"]),
            ]
            for m in rows
        ],
    )


# -- devices ----------------------------------------------------------------------------------


def _parse_tags(tags: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for t in tags:
        k, sep, v = t.partition("=")
        if not sep or not k:
            raise _fail(f"--tag {t!r} must be KEY=VALUE")
        out[k] = v
    return out


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
        "tags": _parse_tags(tag or []),
        "sequence": sequence,
        "version": version,
        "transport": transport,
        "hardware_id": hardware_id,
    }
    with api() as client:
        d = client.post("/devices", body)
    if as_json:
        _print_json(d)
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
        _print_json(result)
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
        _print_json(page)
        return
    items = page["items"]
    title = f"devices {offset + 1 if items else 0}-{offset + len(items)} of {page['total']}"
    _table(
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
        _print_json(d)
    else:
        _fields(
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
        _print_json(page)
        return
    _table(
        f"{page['total']} dead letters",
        ["at", "device", "transport", "reason", "error"],
        [[_short(d["at"]), d["device"], d["transport"], d["reason"], d["error"]] for d in page["items"]],
    )


# -- campaigns --------------------------------------------------------------------------------


def read_campaign_file(path: Path) -> dict[str, Any]:
    """A campaign definition in TOML (``[campaign]``, ``[rollout]``, ``[[phase]]``; docs/rollout.md)."""
    try:
        d = load_definition(path.read_text())
    except OSError as exc:
        raise _fail(f"cannot read {path}: {exc.strerror or exc}") from None
    except DefinitionError as exc:
        raise _fail(f"{path}: {exc}") from None
    spec: dict[str, Any] = {
        "name": d.name,
        "filter": d.filter,
        "policy": d.policy,
        "attestation": d.attestation,
    }
    if d.consent is not None:
        spec["consent"] = d.consent
    if d.manifest is not None:
        spec["manifest"] = d.manifest
    return spec


def _campaign_row(c: dict[str, Any]) -> list[Any]:
    return [
        c["id"],
        c["name"],
        c["state"],
        c["manifest_id"],
        c["total"],
        c["filter"],
        _short(c["started_at"]),
    ]


_CAMPAIGN_COLUMNS = ["id", "name", "state", "manifest", "devices", "filter", "started"]


@campaign_app.command("create")
def campaign_create(
    name: Annotated[str | None, typer.Option(help="Campaign name")] = None,
    manifest: Annotated[int | None, typer.Option("--manifest", help="Manifest id")] = None,
    filter: Annotated[str | None, typer.Option("--filter", "-f", help="Device filter (empty: all)")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Campaign definition (TOML)")] = None,
    attestation: Annotated[
        bool | None, typer.Option("--attestation/--no-attestation", help="Devices attest before install")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a draft campaign; options override the values in --file."""
    spec: dict[str, Any] = read_campaign_file(file) if file else {"policy": {}}
    if name is not None:
        spec["name"] = name
    if manifest is not None:
        spec["manifest"] = manifest
    if filter is not None:
        spec["filter"] = filter
    for required in ("name", "manifest"):
        if required not in spec:
            raise _fail(f"--{required} is required (or set it in --file)")
    body = {
        "name": spec["name"],
        "manifest_id": spec["manifest"],
        "filter": spec.get("filter", ""),
        "policy": spec.get("policy", {}),
        "attestation": spec.get("attestation", False) if attestation is None else attestation,
    }
    if spec.get("consent") is not None:
        body["consent"] = spec["consent"]
    with api() as client:
        c = client.post("/campaigns", body)
    if as_json:
        _print_json(c)
    else:
        typer.echo(f"campaign {c['id']} created (draft); start it with `fwcm campaign start {c['id']}`")


@campaign_app.command("list")
def campaign_list(
    state: Annotated[str | None, typer.Option(help="Only campaigns in this state")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List campaigns."""
    with api() as client:
        rows = client.get("/campaigns", state=state)
    if as_json:
        _print_json(rows)
    else:
        _table("campaigns", _CAMPAIGN_COLUMNS, [_campaign_row(c) for c in rows])


@campaign_app.command("show")
def campaign_show(
    campaign_id: Annotated[int, typer.Argument(metavar="ID")], as_json: JsonOpt = False
) -> None:
    """Show one campaign's definition and state."""
    with api() as client:
        c = client.get(f"/campaigns/{campaign_id}")
    if as_json:
        _print_json(c)
    else:
        _fields(
            f"campaign {c['id']}",
            c,
            [
                "id",
                "name",
                "state",
                "stop_reason",
                "manifest_id",
                "filter",
                "policy",
                "phase",
                "total",
                "created_at",
                "started_at",
                "finished_at",
            ],
        )


def _action(action: str, doc: str) -> Callable[..., None]:
    def command(campaign_id: Annotated[int, typer.Argument(metavar="ID")], as_json: JsonOpt = False) -> None:
        with api() as client:
            c = client.post(f"/campaigns/{campaign_id}/{action}")
        if as_json:
            _print_json(c)
        elif action == "start":
            typer.echo(f"campaign {c['id']} running over {c['total']} devices")
        else:
            typer.echo(f"campaign {c['id']} {c['state']}")

    command.__doc__ = doc
    command.__name__ = f"campaign_{action}"
    return command


campaign_start = campaign_app.command("start")(
    _action("start", "Freeze the matching devices and start the rollout.")
)
campaign_pause = campaign_app.command("pause")(
    _action("pause", "Stop new notices; devices in progress finish.")
)
campaign_resume = campaign_app.command("resume")(_action("resume", "Continue a paused campaign."))
campaign_cancel = campaign_app.command("cancel")(
    _action("cancel", "Withdraw the update from devices that have not started installing.")
)


def print_status(stats: dict[str, Any]) -> None:
    """Human summary of ``GET /campaigns/{id}/stats``."""
    counts = stats["counts"]
    total = stats["total"]
    done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "skipped", "timed_out", "cancelled"))
    head = f"campaign {stats['id']} ({stats['name']}): {stats['state']}, phase {stats['phase']}, "
    head += f"{done}/{total} finished"
    if stats.get("stop_reason"):
        head += f"; reason: {stats['stop_reason']}"
    console = _console()
    console.print(head)
    table = Table(show_header=True)
    for s in counts:
        table.add_column(s, justify="right")
    table.add_row(*[str(n) for n in counts.values()])
    console.print(table)
    if stats["failures"]:
        _table(
            "failure reasons",
            ["result", "name", "devices"],
            [[f["result"], f["name"], f["count"]] for f in stats["failures"]],
        )


@campaign_app.command("status")
def campaign_status(
    campaign_id: Annotated[int, typer.Argument(metavar="ID")], as_json: JsonOpt = False
) -> None:
    """Counts of devices per state and the most common failure reasons."""
    with api() as client:
        stats = client.get(f"/campaigns/{campaign_id}/stats")
    if as_json:
        _print_json(stats)
    else:
        print_status(stats)


@accounting_app.command("report")
def accounting_report(
    campaign: Annotated[int, typer.Option("--campaign", help="Campaign id")],
    as_json: JsonOpt = False,
) -> None:
    """Per device: usage counters of the installed software and how its use ended."""
    with api() as client:
        report = client.get(f"/campaigns/{campaign}/accounting")
    if as_json:
        _print_json(report)
        return
    _table(
        f"accounting of campaign {campaign}: {report['reporting']} devices, {report['total_uses']} uses, "
        f"{report['removed']} removed",
        ["device", "uses", "seconds", "last report", "ended", "detail"],
        [
            [
                r["device"],
                r["uses"],
                r["seconds"],
                f"{r['last_kind']} {_short(r['last_report_at'])}",
                "removed" if r["removed"] else ("yes" if r["ended"] else ""),
                r["detail"] or "",
            ]
            for r in report["devices"]
        ],
    )


@campaign_app.command("devices")
def campaign_devices(
    campaign_id: Annotated[int, typer.Argument(metavar="ID")],
    state: Annotated[str | None, typer.Option(help="Only devices in this state, e.g. failed")] = None,
    limit: Annotated[int, typer.Option(help="At most this many")] = 100,
    offset: Annotated[int, typer.Option(help="Skip this many")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Devices of a campaign with their state and result."""
    with api() as client:
        page = client.get(f"/campaigns/{campaign_id}/devices", state=state, limit=limit, offset=offset)
    if as_json:
        _print_json(page)
        return
    title = f"campaign {campaign_id}: {page['total']} devices" + (f" {state}" if state else "")
    _table(
        title,
        ["device", "state", "result", "detail", "phase", "attempt", "updated"],
        [
            [
                d["device"],
                d["state"],
                d["result_name"],
                d["detail"],
                d["phase"],
                d["attempt"],
                _short(d["updated_at"]),
            ]
            for d in page["items"]
        ],
    )


@campaign_app.command("events")
def campaign_events(
    campaign_id: Annotated[int, typer.Argument(metavar="ID")], as_json: JsonOpt = False
) -> None:
    """Every state change of a campaign with its time and reason."""
    with api() as client:
        rows = client.get(f"/campaigns/{campaign_id}/events")
    if as_json:
        _print_json(rows)
    else:
        _table(
            f"campaign {campaign_id} history",
            ["at", "state", "reason"],
            [[_short(e["at"]), e["state"], e["reason"]] for e in rows],
        )
