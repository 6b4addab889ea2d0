"""Pace and ETA of a campaign (pure): what ``campaign watch`` and ``campaign status`` show.

The pace is measured over a sliding window of completions (devices that reached succeeded,
failed, timed out or skipped; a cancelled device is not a completion), never as an average since
the start. The ETA follows the rules that bound the rollout rather than extrapolating the pace
alone: pending devices leave at most at the rate limit (or ramp), only while the maintenance
window is open, and a phase that waits for approval ends the estimate, which then covers the
phases up to it. When there is nothing to estimate from, ``why`` says so ("waiting for approval
of phase 2", "outside the window until 02:00 Europe/Berlin", "measuring the pace").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from statistics import median

from fwcm.rollout.policy import Policy
from fwcm.rollout.values import Window

PACE_WINDOW_S = 300.0
"""Completions of the last five minutes make the pace."""
MIN_SPAN_S = 10.0
"""A pace is not measured over less than this: two quick completions are not a rate."""
MAX_WINDOW_DAYS = 400
"""A walk through maintenance windows stops here (the ETA is then unknown)."""


@dataclass(frozen=True)
class Completion:
    """A device that finished within the pace window: when it was notified and when it finished."""

    done_at: float
    notified_at: float | None = None


@dataclass(frozen=True)
class Progress:
    """What the store knows of a campaign now (POSIX seconds)."""

    state: str
    phase: int
    """Current phase, 0-based."""
    pending: Mapping[int, int]
    """Pending devices per phase."""
    in_flight: int
    succeeded: int = 0
    completions: Sequence[Completion] = ()
    consent_stage: str | None = None


@dataclass(frozen=True)
class Estimate:
    per_minute: float | None = None
    """Completions per minute over the pace window; None before there is one."""
    eta_s: float | None = None
    """Seconds until the devices in ``scope`` are done; None when it cannot be estimated."""
    scope: str | None = None
    """What the ETA reaches when not the end: ``"end of phase 1 (canary)"``."""
    why: str | None = None
    """Why there is no ETA, or what it waits for after ``scope``."""
    notes: tuple[str, ...] = field(default=())


def pace(completions: Sequence[Completion], now: float) -> float | None:
    """Completions per minute over the sliding window ending at ``now``.

    The window starts ``PACE_WINDOW_S`` ago, or later: when the first of its devices was
    notified, so a young campaign is not diluted by time before anything was sent.
    """
    start = now - PACE_WINDOW_S
    recent = [c for c in completions if start <= c.done_at <= now]
    if not recent:
        return None
    first = min(c.notified_at if c.notified_at is not None else c.done_at for c in recent)
    span = max(now - max(start, first), MIN_SPAN_S)
    return len(recent) * 60.0 / span


def latency(completions: Sequence[Completion]) -> float | None:
    """Median seconds from notice to completion of the window's devices."""
    spans = [c.done_at - c.notified_at for c in completions if c.notified_at is not None]
    return median(spans) if spans else None


def open_time(window: Window | None, start: float, busy_s: float) -> float | None:
    """When ``busy_s`` seconds of work that can only run while ``window`` is open are done, from
    ``start``; None if that is more than ``MAX_WINDOW_DAYS`` ahead."""
    if window is None:
        return start + busy_s
    t, left = start, busy_s
    for _ in range(MAX_WINDOW_DAYS + 2):
        opens, closes = window.span(t)
        t = max(t, opens)
        if t + left <= closes:
            return t + left
        left -= closes - t
        t = closes
    return None


def _clock(window: Window, at: float) -> str:
    return f"{datetime.fromtimestamp(at, window.zone):%H:%M} {window.tz}"


def estimate(policy: Policy, p: Progress, now: float) -> Estimate:
    """Pace and ETA of a campaign; see the module docstring for the rules."""
    per_minute = pace(p.completions, now)
    shown = round(per_minute, 1) if per_minute is not None else None
    if p.state not in ("running", "paused", "scheduled"):
        return Estimate(per_minute=shown)
    last = len(policy.phases) - 1
    cur = min(max(p.phase, 0), last)
    if p.state == "scheduled":
        return Estimate(per_minute=shown, why="scheduled: starts at its start_at")
    if p.consent_stage is not None and p.consent_stage != "granted":
        return Estimate(per_minute=shown, why=f"waiting for consent ({p.consent_stage})")
    if p.state == "paused":
        waiting = cur > 0 and policy.phases[cur - 1].advance == "approval" and p.pending.get(cur, 0) > 0
        why = f"waiting for approval of {policy.label(cur)}" if waiting else "paused"
        return Estimate(per_minute=shown, why=why)

    gate = next((i for i in range(cur, last) if policy.phases[i].advance == "approval"), None)
    horizon = last if gate is None else gate
    scope = None if gate is None else f"end of {policy.label(gate)}"
    after = None if gate is None else f"then waiting for approval of {policy.label(gate + 1)}"
    pending = sum(n for i, n in p.pending.items() if i <= horizon)
    window = policy.window
    notes: list[str] = []
    if window is not None and not window.contains(now):
        notes.append(f"outside the window until {_clock(window, window.span(now)[0])}")

    took = latency(p.completions)
    rate = policy.effective_rate(p.succeeded)
    per_s = rate / 60.0 if rate is not None else (per_minute / 60.0 if per_minute else None)
    if pending == 0:
        if p.in_flight == 0:
            return Estimate(per_minute=shown, eta_s=0.0, scope=scope, why=after, notes=tuple(notes))
        if per_minute:
            busy = p.in_flight * 60.0 / per_minute
        elif took is not None:
            busy = took
        else:
            return Estimate(per_minute=shown, scope=scope, why="measuring the pace", notes=tuple(notes))
        end = open_time(window, now, busy)
    else:
        if per_s is None or per_s <= 0:
            why = notes[0] if notes else "measuring the pace"
            return Estimate(per_minute=shown, scope=scope, why=why, notes=tuple(notes))
        sent = open_time(window, now, pending / per_s)
        end = None if sent is None else sent + (took or 0.0)
    if end is None or not math.isfinite(end):
        return Estimate(per_minute=shown, scope=scope, why="more than a year ahead", notes=tuple(notes))
    return Estimate(per_minute=shown, eta_s=round(end - now, 1), scope=scope, why=after, notes=tuple(notes))
