"""``fwcm campaign …`` and ``fwcm accounting report``: campaigns of a tenant, from a TOML
definition to their progress (``fwcm campaign watch`` is in ``fwcm.cli.watch``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from fwcm.cli.common import JsonOpt, api, fail, print_fields, print_json, print_table, rich_console, short
from fwcm.rollout import outcome
from fwcm.rollout.definition import DefinitionError, load_definition
from fwcm.rollout.states import DEVICE_TERMINAL

accounting_app = typer.Typer(help="Usage reported by installed software.", no_args_is_help=True)
campaign_app = typer.Typer(
    help="Campaigns: a manifest rolled out to a filtered set of devices.", no_args_is_help=True
)


def read_campaign_file(path: Path) -> dict[str, Any]:
    """A campaign definition in TOML (``[campaign]``, ``[rollout]``, ``[[phase]]``; docs/rollout.md)."""
    try:
        d = load_definition(path.read_text())
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror or exc}") from None
    except DefinitionError as exc:
        if len(exc.errors) > 1:
            more = [f"... and {exc.more} more"] if exc.more else []
            raise fail(f"{path}: {len(exc.errors) + exc.more} problems", exc.errors + more) from None
        where, _, message = exc.errors[0].partition(": ")
        if not where.startswith("line "):
            raise fail(f"{path}: {exc}") from None
        raise fail(f"{path}: {message} ({where})") from None
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
        short(c["started_at"]),
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
            raise fail(f"--{required} is required (or set it in --file)")
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
        print_json(c)
    else:
        _warn(c)
        typer.echo(f"campaign {c['id']} created (draft); start it with `fwcm campaign start {c['id']}`")


def _warn(c: dict[str, Any]) -> None:
    """Print the server's warnings about a campaign (a filter naming a tag no device has)."""
    for w in c.get("warnings") or ():
        typer.echo(f"warning: {w}", err=True)


@campaign_app.command("list")
def campaign_list(
    state: Annotated[str | None, typer.Option(help="Only campaigns in this state")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List campaigns."""
    with api() as client:
        rows = client.items("/campaigns", state=state)
    if as_json:
        print_json(rows)
    else:
        print_table("campaigns", _CAMPAIGN_COLUMNS, [_campaign_row(c) for c in rows])


@campaign_app.command("show")
def campaign_show(
    campaign_id: Annotated[int, typer.Argument(metavar="ID")], as_json: JsonOpt = False
) -> None:
    """Show one campaign's definition and state."""
    with api() as client:
        c = client.get(f"/campaigns/{campaign_id}")
    if as_json:
        print_json(c)
    else:
        print_fields(
            f"campaign {c['id']}",
            {**c, "phase": c["phase"] + 1},  # 1-based, as status and watch say it
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
            print_json(c)
        else:
            typer.echo(f"campaign {c['id']} {c['state']}")

    command.__doc__ = doc
    command.__name__ = f"campaign_{action}"
    return command


@campaign_app.command("start")
def campaign_start(
    campaign_id: Annotated[int, typer.Argument(metavar="ID")],
    allow_empty: Annotated[
        bool,
        typer.Option("--allow-empty", help="Start even if the filter matches no device (refused otherwise)"),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Freeze the matching devices and start the rollout."""
    with api() as client:
        c = client.post(
            f"/campaigns/{campaign_id}/start", {"allow_empty": allow_empty} if allow_empty else None
        )
    if as_json:
        print_json(c)
        return
    _warn(c)
    typer.echo(f"campaign {c['id']} {c['state']} over {c['total']} devices")


campaign_pause = campaign_app.command("pause")(
    _action("pause", "Stop new notices; devices in progress finish.")
)
campaign_resume = campaign_app.command("resume")(
    _action(
        "resume",
        "Continue a paused campaign, or a stopped one after review (the failures that stopped it "
        "are accepted; later ones count again).",
    )
)


@campaign_app.command("clone")
def campaign_clone(
    campaign_id: Annotated[int, typer.Argument(metavar="ID")],
    name: Annotated[str | None, typer.Option(help='Name of the new draft (default "<name> (copy)")')] = None,
    as_json: JsonOpt = False,
) -> None:
    """A new draft with the same manifest, filter and policy."""
    with api() as client:
        c = client.post(f"/campaigns/{campaign_id}/clone", {"name": name} if name else {})
    if as_json:
        print_json(c)
    else:
        typer.echo(f"campaign {c['id']} ({c['name']}) created as a draft from campaign {campaign_id}")


@campaign_app.command("retry")
def campaign_retry(
    campaign_id: Annotated[int, typer.Argument(metavar="ID")],
    failed: Annotated[bool, typer.Option("--failed", help="The failed and timed-out devices")] = False,
    as_json: JsonOpt = False,
) -> None:
    """A new attempt for the failed and timed-out devices (--failed) of a running or ended campaign."""
    if not failed:
        raise fail("say which devices to retry: --failed (failed and timed-out devices)")
    with api() as client:
        out = client.post(f"/campaigns/{campaign_id}/retry")
    if as_json:
        print_json(out)
    else:
        typer.echo(f"campaign {campaign_id} {out['campaign']['state']}: {out['retried']} devices retried")


@campaign_app.command("delete")
def campaign_delete(campaign_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
    """Delete a draft or an ended campaign with its deployments and events."""
    with api() as client:
        client.delete(f"/campaigns/{campaign_id}")
    typer.echo(f"campaign {campaign_id} deleted")


campaign_cancel = campaign_app.command("cancel")(
    _action("cancel", "Withdraw the update from devices that have not started installing.")
)


def print_status(stats: dict[str, Any]) -> None:
    """Human summary of ``GET /campaigns/{id}/stats``: the same phase, pace and counts as ``watch``."""
    from fwcm.cli.watch import count_tables, pace_line

    label = stats.get("phase_label") or f"phase {stats['phase'] + 1}"
    finished = sum(stats["counts"].get(s.value, 0) for s in DEVICE_TERMINAL)
    head = f"campaign {stats['id']} ({stats['name']}): {stats['state']}, {label}, "
    head += f"{finished}/{stats['total']} finished"
    if stats.get("stop_reason"):
        head += f"; reason: {stats['stop_reason']}"
    console = rich_console()
    console.print(head, highlight=False)
    console.print(pace_line(stats))
    if stats.get("eta_note"):
        console.print(stats["eta_note"], highlight=False)
    for table in count_tables(stats):
        console.print(table)
    if stats["failures"]:
        print_table(
            "failure reasons",
            ["state", "result", "name", "devices"],
            [[f["state"], f["result"], f["name"], f["count"]] for f in stats["failures"]],
        )
    if stats.get("skips"):
        print_table(
            "not for them (no failure)",
            ["state", "result", "name", "devices"],
            [[f["state"], f["result"], f["name"], f["count"]] for f in stats["skips"]],
        )


@campaign_app.command("status")
def campaign_status(
    campaign_id: Annotated[int, typer.Argument(metavar="ID")],
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Wait until the campaign has ended; exit 0 only if it completed with no failed, "
            "timed-out or reverted device (1 stopped, 2 --timeout passed, 3 cancelled, 4 failed or "
            "timed-out devices, 5 reverted devices)",
        ),
    ] = False,
    interval: Annotated[float, typer.Option(help="With --wait: seconds between polls")] = 2.0,
    timeout: Annotated[
        float | None, typer.Option(help="With --wait: give up after this many seconds")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Counts of devices per state, failure reasons apart from skips; --wait for the end."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with api() as client:
        stats = client.get(f"/campaigns/{campaign_id}/stats")
        while wait and not outcome.ended(stats["state"], stats["counts"]):
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(interval)
            stats = client.get(f"/campaigns/{campaign_id}/stats")
    if as_json:
        print_json(stats)
    else:
        print_status(stats)
    if wait:
        ended = outcome.ended(stats["state"], stats["counts"])
        code = outcome.exit_code(stats["state"], stats["counts"]) if ended else outcome.CampaignExit.GAVE_UP
        raise typer.Exit(int(code))


@accounting_app.command("report")
def accounting_report(
    campaign: Annotated[int, typer.Option("--campaign", help="Campaign id")],
    as_json: JsonOpt = False,
) -> None:
    """Per device: usage counters of the installed software and how its use ended."""
    with api() as client:
        report = client.get(f"/campaigns/{campaign}/accounting")
    if as_json:
        print_json(report)
        return
    print_table(
        f"accounting of campaign {campaign}: {report['reporting']} devices, {report['total_uses']} uses, "
        f"{report['removed']} removed",
        ["device", "uses", "seconds", "last report", "ended", "detail"],
        [
            [
                r["device"],
                r["uses"],
                r["seconds"],
                f"{r['last_kind']} {short(r['last_report_at'])}",
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
        print_json(page)
        return
    title = f"campaign {campaign_id}: {page['total']} devices" + (f" {state}" if state else "")
    print_table(
        title,
        ["device", "state", "result", "detail", "phase", "attempt", "updated"],
        [
            [
                d["device"],
                d["state"],
                d["result_name"],
                d["detail"],
                d["phase"] + 1,
                d["attempt"],
                short(d["updated_at"]),
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
        rows = client.items(f"/campaigns/{campaign_id}/events")
    if as_json:
        print_json(rows)
    else:
        print_table(
            f"campaign {campaign_id} history",
            ["at", "state", "reason"],
            [[short(e["at"]), e["state"], e["reason"]] for e in rows],
        )
