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
DONE = ("succeeded", "failed", "skipped", "timed_out", "reverted")
"""Devices that completed: a cancelled device is counted apart, never as done."""
IN_FLIGHT = ("notified", "downloading", "downloaded", "installing")
WAITING = ("pending", *IN_FLIGHT)
CONSENT = ("invited", "declined", "no_answer")
"""Deployment states of consent campaigns only: no columns for them on other campaigns."""
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
WIDTH = 80
"""The screen fits a terminal this wide: every header spelled out, nothing cut."""
INNER = WIDTH - 4
"""Inside the panel's borders and padding."""
_NAME_CHARS = 24


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def ended(stats: dict[str, Any]) -> bool:
    """A campaign has ended for the watcher once it is final and no device is still working."""
    return outcome.ended(stats["state"], stats["counts"])


def pace_line(stats: dict[str, Any]) -> Text:
    """Done so far, the pace over the last minutes and the ETA, or why there is none."""
    counts: dict[str, int] = stats["counts"]
    done = sum(counts.get(s, 0) for s in DONE)
    cancelled = counts.get("cancelled", 0)
    text = Text(f"{done}/{stats['total'] or 0} done")
    if cancelled:
        text.append(f", {cancelled} cancelled")
    per_minute = stats.get("per_minute")
    text.append("   pace " + (f"{per_minute:g}/min" if per_minute is not None else "—"))
    if stats["state"] in ("running", "paused", "scheduled"):
        text.append("   ETA ")
        text.append(_eta(stats.get("eta_s")), style="bold")
        if stats.get("eta_scope"):
            text.append(f" to {stats['eta_scope']}")
    return text


def count_tables(stats: dict[str, Any]) -> list[RenderableType]:
    """Counts per state in two rows (waiting and in flight; finished), plus the consent states on
    a consent campaign only; full state names, each row narrower than ``WIDTH``."""
    counts: dict[str, int] = stats["counts"]
    groups: list[tuple[str, tuple[str, ...]]] = [("in progress", WAITING)]
    if stats.get("consent") is not None:
        groups.append(("consent", CONSENT))
    known = {*WAITING, *CONSENT}
    groups.append(("finished", tuple(st for st in counts if st not in known)))
    out: list[RenderableType] = []
    for label, states in groups:
        table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        table.add_column("", min_width=11, no_wrap=True)
        for st in states:
            table.add_column(st, justify="right", style=STATE_STYLE.get(st, ""), no_wrap=True)
        table.add_row(label, *(str(counts.get(st, 0)) for st in states))
        out.append(table)
    return out


def bytes_line(b: dict[str, int]) -> str:
    """What a delta campaign's devices fetched, and the saving against full images."""
    sent = b["delta"] + b["full"]
    saved = 1 - sent / b["without_deltas"] if b["without_deltas"] else 0.0
    return (
        f"bytes {sent:,} sent ({b['delta']:,} as patches to {b['devices_on_delta']}); "
        f"saved {saved:.0%} of {b['without_deltas']:,}"
    )


def render(stats: dict[str, Any]) -> RenderableType:
    """One screen of at most ``WIDTH`` columns: header, pace and ETA, a bar per phase, counts per
    state and failure reasons."""
    names: list[str] = stats.get("phase_names") or []
    phase_count = max(len(names), len(stats.get("phases", {})), 1)
    head = Text.assemble(
        (f"campaign {stats['id']} ", "bold"),
        (f"{_short(stats['name'], _NAME_CHARS)}  ", ""),
        (
            stats["state"].upper(),
            "bold green" if stats["state"] in ("running", "completed") else "bold yellow",
        ),
    )
    if phase_count > 1:
        n = stats["phase"] + 1
        label = (stats.get("phase_label") or f"phase {n}").replace(
            f"phase {n}", f"phase {n}/{phase_count}", 1
        )
        head.append(f"   {_short(label, INNER - 3 - len(head))}")
    parts: list[RenderableType] = [head, pace_line(stats)]
    if stats.get("eta_note"):
        parts.append(Text(stats["eta_note"], style="cyan"))
    if stats.get("stop_reason"):
        parts.append(Text(f"reason: {stats['stop_reason']}", style="yellow"))
    if stats.get("note") and stats["note"] != stats.get("eta_note"):
        parts.append(Text(f"note: {stats['note']}", style="cyan"))

    phases = Table.grid(padding=(0, 1))
    phases.add_column(no_wrap=True, max_width=_NAME_CHARS + 2)
    phases.add_column(ratio=1)
    phases.add_column(justify="right", no_wrap=True)
    for key, pc in sorted(stats.get("phases", {}).items(), key=lambda kv: int(kv[0])):
        i = int(key)
        size = sum(pc.values())
        fin = sum(pc.get(s, 0) for s in FINAL)
        label = names[i] if i < len(names) else f"phase {i + 1}"
        marker = "▶ " if i == stats.get("phase") and stats["state"] == "running" else "  "
        phases.add_row(
            f"{marker}{_short(label, _NAME_CHARS)}",
            ProgressBar(total=max(size, 1), completed=fin),
            f"{fin}/{size}",
        )
    parts.append(phases)
    parts.extend(count_tables(stats))
    if stats.get("bytes"):
        parts.append(Text(bytes_line(stats["bytes"]), style="cyan"))

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
    failed or timed-out devices, 5 completed with reverted devices.

    The pace counts devices that completed in the last 5 minutes (cancelled ones are not done);
    the ETA follows the rate limit, the maintenance window and phases that wait for approval,
    or says why it cannot estimate. The screen fits 80 columns.
    """
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
