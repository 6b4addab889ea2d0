"""What every client command shares: the API client, ``--json``, error exits and rich output.

Each command talks to the server through ``api()``; every read command takes ``--json`` for
scripts and otherwise prints a rich table.  Errors are one ``error: …`` line and exit code 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fwcm.cli.client import ApiClient, ApiError

make_client: Callable[[], ApiClient] = ApiClient.from_env
"""How commands obtain a client (the environment and config file by default)."""

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def fail(message: str, problems: list[str] | None = None) -> typer.Exit:
    """Print one ``error:`` line, then each of ``problems`` indented below it; the caller raises
    the returned exit (code 1)."""
    typer.echo(f"error: {message}", err=True)
    for problem in problems or []:
        typer.echo(f"  {problem}", err=True)
    return typer.Exit(1)


@contextmanager
def api() -> Iterator[ApiClient]:
    """A client for one command; any ApiError ends the command with one error line."""
    try:
        client = make_client()
        with client:
            yield client
    except ApiError as exc:
        raise fail(str(exc), exc.errors if len(exc.errors) > 1 else None) from None


def rich_console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=False))


def print_table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*["" if v is None else str(v) for v in r])
    rich_console().print(table)


def print_fields(title: str, data: dict[str, Any], keys: list[str]) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for k in keys:
        v = data.get(k)
        if isinstance(v, (dict, list)):
            v = json.dumps(v) if v else ""
        table.add_row(k, "" if v is None else str(v))
    rich_console().print(table)


def short(ts: str | None) -> str:
    """An ISO timestamp to the second, readable in a table column."""
    return (ts or "")[:19].replace("T", " ")


def parse_tags(tags: list[str]) -> dict[str, str]:
    """Repeated ``--tag KEY=VALUE`` options as a dict."""
    out: dict[str, str] = {}
    for t in tags:
        k, sep, v = t.partition("=")
        if not sep or not k:
            raise fail(f"--tag {t!r} must be KEY=VALUE")
        out[k] = v
    return out
