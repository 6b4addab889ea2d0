"""``fwcm webhook …``: URLs the server posts the tenant's signed events to, and their delivery logs."""

from __future__ import annotations

from typing import Annotated

import typer

from fwcm.cli.common import JsonOpt, api, print_json, print_table, short
from fwcm.webhooks import EVENT_TYPES

_TYPES = ", ".join(EVENT_TYPES) + "; default all"

webhook_app = typer.Typer(
    help="Webhooks: URLs that receive the tenant's signed campaign and device events.",
    no_args_is_help=True,
)


@webhook_app.command("add")
def webhook_add(
    url: Annotated[str, typer.Argument(help="http or https URL the server will POST to", metavar="URL")],
    events: Annotated[
        list[str] | None,
        typer.Option(
            "--events", help=f"Event type to receive (repeat; default all): {', '.join(EVENT_TYPES)}"
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a webhook. The server calls out to URL with every event of this tenant from now
    on; the signing secret is printed once, keep it to verify the X-Fwcm-Signature header."""
    chosen = [e.strip() for opt in events or [] for e in opt.split(",") if e.strip()]
    with api() as client:
        hook = client.post("/webhooks", {"url": url, "events": chosen or None})
    if as_json:
        print_json(hook)
        return
    typer.echo(
        f"webhook {hook['id']} added for {hook['url']} ({', '.join(hook['events'] or ['all events'])})"
    )
    typer.echo(f"secret: {hook['secret']}")
    typer.echo("the secret is shown only now: store it where the receiver verifies signatures")


@webhook_app.command("list")
def webhook_list(as_json: JsonOpt = False) -> None:
    """List the tenant's webhooks and how many deliveries wait for each."""
    with api() as client:
        hooks = client.items("/webhooks")
    if as_json:
        print_json(hooks)
        return
    print_table(
        "webhooks",
        ["id", "url", "events", "pending", "created"],
        [
            [h["id"], h["url"], ", ".join(h["events"] or ["all"]), h["pending"], short(h["created_at"])]
            for h in hooks
        ],
    )


@webhook_app.command("remove")
def webhook_remove(webhook_id: Annotated[int, typer.Argument(metavar="ID", min=1)]) -> None:
    """Remove a webhook: nothing more is sent to it; its waiting deliveries and log go too."""
    with api() as client:
        client.request("DELETE", f"/webhooks/{webhook_id}")
    typer.echo(f"webhook {webhook_id} removed")


@webhook_app.command("deliveries")
def webhook_deliveries(
    webhook_id: Annotated[int, typer.Argument(metavar="ID", min=1)],
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many, newest first")] = 50,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip this many newer deliveries")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """One page of the delivery log of a webhook, newest first: state, attempts, last status and
    error."""
    with api() as client:
        page = client.get(f"/webhooks/{webhook_id}/deliveries", limit=limit, offset=offset)
    if as_json:
        print_json(page)
        return
    items = page["items"]
    shown = f"{offset + 1 if items else 0}-{offset + len(items)} of {page['total']}"
    print_table(
        f"webhook {webhook_id} deliveries {shown}",
        ["event", "type", "state", "attempts", "last status", "last error", "last try", "next try"],
        [
            [
                d["event_id"],
                d["type"],
                d["state"],
                d["attempts"],
                d["last_status"],
                d["last_error"],
                short(d["last_at"]),
                short(d["next_at"]),
            ]
            for d in items
        ],
    )
