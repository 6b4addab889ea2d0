"""``fwcm login`` and ``whoami``: which server and tenant the client commands use."""

from __future__ import annotations

from typing import Annotated

import typer

from fwcm.cli.client import ApiClient, ApiError, load_config, save_config
from fwcm.cli.common import JsonOpt, api, fail, print_json


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
            raise fail(f"login refused: {exc}") from None
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
        print_json({"url": load_config().url, **tenant})
    else:
        typer.echo(f"{tenant['slug']} ({tenant['name']}) at {client.url}")
