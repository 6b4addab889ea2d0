"""What a campaign shows while it runs and after: counts per state and phase, failures and skips
by result, pace and ETA, its devices and its event history.  SQL only: the pace and phase labels
come from ``rollout.launch`` through the callers' arguments."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    func,
    select,
)
from sqlalchemy.orm import Session

from fwcm.errors import Invalid
from fwcm.protocol import Result
from fwcm.rollout.launch import (
    Pacer,
    PhaseNamer,
)
from fwcm.rollout.pace import PACE_WINDOW_S, Completion, Progress
from fwcm.rollout.states import (
    AGAINST_ERRORS,
    IN_PROGRESS,
    NOT_FOR_ME,
    DeviceState,
)
from fwcm.store import deltas
from fwcm.store.campaigns import get_campaign
from fwcm.store.counts import phase_counts
from fwcm.store.models import (
    Campaign,
    CampaignEvent,
    Deployment,
    Device,
    utcnow,
)
from fwcm.store.paging import page

Reviewer = Callable[[Iterable[tuple[int, str, int]], int], dict[str, Any]]
"""What resuming a stopped campaign accepts, from its (phase, state, count) rows and current phase
(``rollout.planner.review``)."""

log = logging.getLogger(__name__)

DEPLOYMENT_STATES = tuple(state.value for state in DeviceState)
COMPLETED_STATES = ("succeeded", "failed", "timed_out", "reverted", "skipped")
"""Final states that count towards the pace (a cancelled device did not complete)."""
MAX_PACE_ROWS = 1000
"""The pace and median latency come from at most this many newest completions: enough for a
steady median, and every stats read (``watch`` polls it) stays cheap on a fast campaign."""


def campaign_stats(
    s: Session, tenant_id: int, campaign_id: int, phase_names: PhaseNamer, pace: Pacer
) -> dict[str, Any]:
    """Counts per deployment state, the most common failure results, pace and ETA.

    ``phase_names`` (``rollout.launch.phase_names``) labels the phases of the stored policy;
    ``pace`` (``rollout.launch.pace``) estimates from the recent completions read here.
    """
    campaign = get_campaign(s, tenant_id, campaign_id)
    counts = dict.fromkeys(DEPLOYMENT_STATES, 0)
    phases: dict[int, dict[str, int]] = {}
    # the maintained counts (store.counts), the totals summed from the phases
    for phase, state, n in phase_counts(s, campaign.id):
        phases.setdefault(phase, {})[state] = n
        counts[state] = counts.get(state, 0) + n
    failures = _by_result(s, tenant_id, campaign_id, AGAINST_ERRORS)
    skips = _by_result(s, tenant_id, campaign_id, NOT_FOR_ME)
    progress = Progress(
        state=campaign.state,
        phase=campaign.phase,
        pending={p: c.get("pending", 0) for p, c in phases.items()},
        in_flight=sum(counts.get(st.value, 0) for st in IN_PROGRESS),
        succeeded=counts.get("succeeded", 0),
        completions=_completions(s, campaign_id),
        consent_stage=campaign.consent_stage if campaign.consent is not None else None,
    )
    est = pace(campaign.policy, progress, time.time())
    names = phase_names(campaign.policy)
    return {
        "id": campaign.id,
        "name": campaign.name,
        "state": campaign.state,
        "stop_reason": campaign.stop_reason,
        "note": campaign.note,
        "phase": campaign.phase,
        "phase_label": names[campaign.phase]
        if campaign.phase < len(names)
        else f"phase {campaign.phase + 1}",
        "total": campaign.total,
        "counts": counts,
        "phases": {str(k): v for k, v in sorted(phases.items())},
        "phase_names": names,
        "per_minute": est.per_minute,
        "eta_s": est.eta_s,
        "eta_scope": est.scope,
        "eta_note": "; ".join(n for n in (*est.notes, est.why) if n) or None,
        "failures": failures,
        "skips": skips,
        "started_at": campaign.started_at,
        "finished_at": campaign.finished_at,
        "consent": _consent_stats(campaign, counts, s) if campaign.consent is not None else None,
        "bytes": deltas.bytes_sent(s, campaign.id)
        if deltas.has_deltas(s, tenant_id, campaign.manifest_id)
        else None,
    }


def _completions(s: Session, campaign_id: int) -> list[Completion]:
    """Devices of the campaign that completed within the pace window, newest first (bounded)."""
    since = utcnow() - timedelta(seconds=PACE_WINDOW_S)
    rows = s.execute(
        select(Deployment.notified_at, Deployment.updated_at)
        .where(
            Deployment.campaign_id == campaign_id,
            Deployment.state.in_(COMPLETED_STATES),
            Deployment.updated_at >= since,
        )
        .order_by(Deployment.updated_at.desc())
        .limit(MAX_PACE_ROWS)
    ).all()
    return [
        Completion(done_at=_epoch(r.updated_at), notified_at=_epoch(r.notified_at) if r.notified_at else None)
        for r in rows
        if r.updated_at is not None
    ]


def _epoch(t: datetime) -> float:
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def _by_result(
    s: Session, tenant_id: int, campaign_id: int, states: frozenset[DeviceState]
) -> list[dict[str, Any]]:
    """Devices in ``states`` counted by (state, result), most common first: failures apart from
    skips, each end apart from the others."""
    rows = s.execute(
        select(Deployment.state, Deployment.result, func.count().label("n"))
        .where(
            Deployment.tenant_id == tenant_id,
            Deployment.campaign_id == campaign_id,
            Deployment.state.in_(sorted(st.value for st in states)),
        )
        .group_by(Deployment.state, Deployment.result)
        .order_by(func.count().desc(), Deployment.state, Deployment.result)
    )
    return [
        {"state": r.state, "result": r.result, "name": _end_name(r.state, r.result), "count": r.n}
        for r in rows
    ]


def _end_name(state: str, result: int) -> str:
    """A timeout has no result code of its own: it is named by its state."""
    return state if state == DeviceState.TIMED_OUT.value and result == 0 else _result_name(result)


def _consent_stats(campaign: Campaign, counts: dict[str, int], s: Session) -> dict[str, Any]:
    accepted = s.scalar(
        select(func.count()).where(Deployment.campaign_id == campaign.id, Deployment.choice.is_not(None))
    )
    return {
        "stage": campaign.consent_stage,
        "invited": counts.get("invited", 0),
        "accepted": int(accepted or 0),
        "declined": counts.get("declined", 0),
        "no_answer": counts.get("no_answer", 0),
        "group_decision": campaign.group_decision,
        "quorum": campaign.consent.get("quorum") if campaign.consent else None,
    }


def _result_name(code: int) -> str:
    try:
        return Result(code).name.lower()
    except ValueError:
        return f"code_{code}"


def campaign_devices(
    s: Session,
    tenant_id: int,
    campaign_id: int,
    state: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[int, list[dict[str, Any]]]:
    """Deployments of a campaign (optionally in one state) with their device names."""
    get_campaign(s, tenant_id, campaign_id)
    if state is not None and state not in DEPLOYMENT_STATES:
        raise Invalid(f"unknown state {state!r}; one of {', '.join(DEPLOYMENT_STATES)}")
    cond = [Deployment.tenant_id == tenant_id, Deployment.campaign_id == campaign_id]
    if state is not None:
        cond.append(Deployment.state == state)
    total = s.scalar(select(func.count()).select_from(Deployment).where(*cond)) or 0
    rows = s.execute(
        select(Deployment, Device.name)
        .join(Device, Device.id == Deployment.device_id)
        .where(*cond)
        .order_by(Device.name)
        .limit(limit)
        .offset(offset)
    ).all()
    return total, [_deployment_out(r.Deployment, r.name) for r in rows]


def _deployment_out(d: Deployment, device: str) -> dict[str, Any]:
    return {
        "device": device,
        "state": d.state,
        "result": d.result,
        "result_name": _result_name(d.result),
        "detail": d.detail,
        "phase": d.phase,
        "attempt": d.attempt,
        "progress": d.progress,
        "notified_at": d.notified_at,
        "updated_at": d.updated_at,
    }


def campaign_events(
    s: Session, tenant_id: int, campaign_id: int, limit: int = 1000, offset: int = 0
) -> tuple[int, Sequence[CampaignEvent]]:
    """A page of a campaign's state changes, oldest first, and how many it has."""
    get_campaign(s, tenant_id, campaign_id)
    query = (
        select(CampaignEvent)
        .where(CampaignEvent.tenant_id == tenant_id, CampaignEvent.campaign_id == campaign_id)
        .order_by(CampaignEvent.id)
    )
    return page(s, query, limit, offset)
