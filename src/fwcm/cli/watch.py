"""``fwcm campaign watch``: a live view of a rollout until it ends."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fwcm.cli.common import api
from fwcm.rollout import outcome

FINAL = ("succeeded", "failed", "skipped", "timed_out", "cancelled")
IN_FLIGHT = ("notified", "downloading", "downloaded", "installing")
STATE_STYLE = {
    "pending": "dim",
    "notified": "cyan",
    "downloading": "blue",
    "downloaded": "blue",
    "installing": "magenta",
    "succeeded": "green",
    "failed": "red",
    "skipped": "yellow",
    "timed_out": "red",
    "cancelled": "dim",
}


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def ended(stats: dict[str, Any]) -> bool:
    """A campaign has ended for the watcher once it is final and no device is still working."""
    return outcome.ended(stats["state"], stats["counts"])


def render(stats: dict[str, Any]) -> RenderableType:
    """One screen: header, a bar per phase, counts per state, pace, ETA and failure reasons."""
    counts: dict[str, int] = stats["counts"]
    total = stats["total"] or 0
    done = sum(counts.get(s, 0) for s in FINAL)
    head = Text.assemble(
        (f"campaign {stats['id']} ", "bold"),
        (f"{stats['name']}  ", ""),
        (
            stats["state"].upper(),
            "bold green" if stats["state"] in ("running", "completed") else "bold yellow",
        ),
        f"   {done}/{total} done   {stats.get('per_minute', 0)} devices/min   ETA {_eta(stats.get('eta_s'))}",
    )
    parts: list[RenderableType] = [head]
    if stats.get("stop_reason"):
        parts.append(Text(f"reason: {stats['stop_reason']}", style="yellow"))
    if stats.get("note"):
        parts.append(Text(f"note: {stats['note']}", style="cyan"))

    phases = Table.grid(padding=(0, 1))
    phases.add_column(justify="left")
    phases.add_column(width=40)
    phases.add_column(justify="right")
    names: list[str] = stats.get("phase_names") or []
    for key, pc in sorted(stats.get("phases", {}).items(), key=lambda kv: int(kv[0])):
        i = int(key)
        size = sum(pc.values())
        fin = sum(pc.get(s, 0) for s in FINAL)
        label = names[i] if i < len(names) else f"phase {i + 1}"
        marker = "▶ " if i == stats.get("phase") and stats["state"] == "running" else "  "
        phases.add_row(f"{marker}{label}", ProgressBar(total=max(size, 1), completed=fin), f"{fin}/{size}")
    parts.append(phases)

    table = Table(show_header=True, header_style="bold", box=None)
    for st in counts:
        table.add_column(st, justify="right", style=STATE_STYLE.get(st, ""))
    table.add_row(*(str(n) for n in counts.values()))
    parts.append(table)

    if stats.get("failures"):
        reasons = Table(title="top failure reasons", show_header=True, box=None, title_justify="left")
        reasons.add_column("result")
        reasons.add_column("devices", justify="right")
        for f in stats["failures"][:5]:
            reasons.add_row(f"{f['result']} {f['name']}", str(f["count"]))
        parts.append(reasons)
    return Panel(Group(*parts), title="fwcm campaign watch", border_style="blue")


def watch(
    campaign_id: Annotated[int, typer.Argument(metavar="ID")],
    interval: Annotated[float, typer.Option(help="Seconds between refreshes")] = 1.0,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds")] = None,
) -> None:
    """Live progress until the campaign ends. Exit 0 only if it completed with no failed, timed-out
    or reverted device; 1 stopped by a threshold, 2 --timeout passed, 3 cancelled, 4 completed with
    failed or timed-out devices, 5 completed with reverted devices."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with api() as client:
        stats = client.get(f"/campaigns/{campaign_id}/stats")
        with Live(render(stats), refresh_per_second=4) as live:
            while not ended(stats):
                if deadline is not None and time.monotonic() > deadline:
                    raise typer.Exit(outcome.CampaignExit.GAVE_UP)
                time.sleep(interval)
                stats = client.get(f"/campaigns/{campaign_id}/stats")
                live.update(render(stats))
    raise typer.Exit(outcome.exit_code(stats["state"], stats["counts"]))
