"""Campaigns of a tenant: create, start (freeze the matching devices), pause, resume, cancel,
status, and the devices that join a dynamic campaign later.

The rules come from the caller: a campaign is created from a checked draft and started by a plan
(``fwcm.rollout.launch``); this module stores them.  Every function takes the caller's
``tenant_id`` and filters on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, Insert, and_, case, func, insert, literal, or_, select, text
from sqlalchemy.orm import Session

from fwcm import filters
from fwcm.errors import Conflict, Invalid, NotFound
from fwcm.protocol import Result
from fwcm.rollout.launch import (
    CampaignDraft,
    PhaseNamer,
    StartPlanner,
    empty_refusal,
    unknown_tag_warnings,
)
from fwcm.rollout.states import (
    AGAINST_ERRORS,
    DEVICE_TERMINAL,
    NOT_FOR_ME,
    DeviceState,
    InvalidTransition,
    action_transition,
)
from fwcm.store.filtersql import filter_clause
from fwcm.store.images import get_manifest
from fwcm.store.models import Campaign, CampaignEvent, Deployment, Device, Manifest, Signer, utcnow

log = logging.getLogger(__name__)

DEPLOYMENT_STATES = tuple(state.value for state in DeviceState)
TERMINAL_STATES = sorted(state.value for state in DEVICE_TERMINAL)


def create_campaign(s: Session, tenant_id: int, manifest_id: int, draft: CampaignDraft) -> Campaign:
    """Store a checked draft; its manifest and consent variants must be manifests of this tenant."""
    for value, variant in draft.variants.items():
        try:
            get_manifest(s, tenant_id, variant)
        except NotFound:
            raise Invalid(f"consent.variants.{value}: manifest {variant} not found") from None
    try:
        get_manifest(s, tenant_id, manifest_id)
    except NotFound:
        raise Invalid(f"manifest {manifest_id} not found") from None
    campaign = Campaign(
        tenant_id=tenant_id,
        name=draft.name,
        manifest_id=manifest_id,
        filter=draft.filter,
        policy=draft.policy,
        attestation=draft.attestation,
        consent=draft.consent,
        state="draft",
        phase=0,
        total=0,
    )
    s.add(campaign)
    s.flush()
    _campaign_event(s, campaign, "draft", None)
    return campaign


def list_campaigns(s: Session, tenant_id: int, state: str | None = None) -> Sequence[Campaign]:
    q = select(Campaign).where(Campaign.tenant_id == tenant_id)
    if state:
        q = q.where(Campaign.state == state)
    return s.scalars(q.order_by(Campaign.id)).all()


def get_campaign(s: Session, tenant_id: int, campaign_id: int, *, lock: bool = False) -> Campaign:
    q = select(Campaign).where(Campaign.tenant_id == tenant_id, Campaign.id == campaign_id)
    if lock:
        q = q.with_for_update()
    campaign = s.scalar(q)
    if campaign is None:
        raise NotFound(f"campaign {campaign_id} not found")
    return campaign


def _campaign_event(s: Session, campaign: Campaign, state: str, reason: str | None) -> None:
    s.add(
        CampaignEvent(
            tenant_id=campaign.tenant_id, campaign_id=campaign.id, at=utcnow(), state=state, reason=reason
        )
    )


def start_campaign(
    s: Session, tenant_id: int, campaign_id: int, plan: StartPlanner, *, allow_empty: bool = False
) -> Campaign:
    """Freeze the matching devices into deployments with one INSERT … SELECT and start running.

    ``plan`` (``rollout.launch.start_plan``) reads the stored policy: the phase of each device by
    its rank, and the state the campaign enters. A start over no device is refused (409) unless
    the campaign is dynamic or ``allow_empty`` says so.
    """
    campaign = get_campaign(s, tenant_id, campaign_id, lock=True)
    if campaign.state not in ("draft", "scheduled"):
        raise Conflict(
            f"campaign {campaign_id} is {campaign.state}; only a draft or scheduled campaign can start"
        )
    cond = and_(Device.tenant_id == tenant_id, filter_clause(filters.parse(campaign.filter)))
    _check_signer_scope(s, campaign, cond)
    matching = s.scalar(select(func.count()).select_from(Device).where(cond)) or 0
    planned = plan(campaign.policy, matching, time.time())
    refused = empty_refusal(campaign.filter, matching, planned, allow_empty)
    if refused is not None:
        raise Conflict(f"campaign {campaign_id} not started: {refused}")
    bounds = planned.bounds
    # Phases by device order: rank < bounds[0] -> phase 0, < bounds[1] -> phase 1, ...
    rank = func.row_number().over(order_by=Device.id) - 1
    whens = [(rank < b, i) for i, b in enumerate(bounds[:-1])]
    phase = case(*whens, else_=len(bounds) - 1) if whens else literal(0)
    result = s.execute(_deployments_of(campaign.id, tenant_id, phase, cond))
    total = result.rowcount  # type: ignore[attr-defined]
    if total is None or total < 0:
        total = s.scalar(select(func.count()).where(Deployment.campaign_id == campaign.id)) or 0
    campaign.total = total
    if s.get_bind().dialect.name == "postgresql":
        # fresh rows: without statistics the planner scans pending rows once per notice batch
        s.execute(text("ANALYZE deployments"))
    campaign.state = planned.state
    campaign.phase = 0
    campaign.started_at = utcnow()
    _campaign_event(s, campaign, campaign.state, f"started with {total} devices")
    s.flush()
    log.info("campaign %d started over %d devices", campaign.id, total)
    return campaign


def _deployments_of(
    campaign_id: int, tenant_id: int, phase: ColumnElement[int], cond: ColumnElement[bool]
) -> Insert:
    """One INSERT … SELECT: a pending deployment in ``phase`` for every device matching ``cond``."""
    source = select(
        literal(campaign_id),
        Device.id,
        literal(tenant_id),
        literal("pending"),
        literal(0),
        phase,
        literal(0),
        literal(-1),
    ).where(cond)
    return insert(Deployment).from_select(
        ["campaign_id", "device_id", "tenant_id", "state", "result", "phase", "attempt", "last_seq"], source
    )


def _check_signer_scope(s: Session, campaign: Campaign, cond: ColumnElement[bool]) -> None:
    """A revoked signer's manifest never starts; a developer build targets listed hardware only."""
    signer = s.scalar(
        select(Signer)
        .join(Manifest, Manifest.signer_id == Signer.id)
        .where(Manifest.id == campaign.manifest_id)
    )
    if signer is None:
        return
    if signer.revoked_at is not None:
        raise Conflict(f"the manifest's signer {signer.name!r} is revoked")
    if signer.hardware_ids is None:
        return
    listed = [str(h) for h in signer.hardware_ids]
    unlisted = (
        s.execute(
            select(Device.name)
            .where(cond, or_(Device.hardware_id.is_(None), Device.hardware_id.notin_(listed)))
            .order_by(Device.id)
        )
        .scalars()
        .all()
    )
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (" …" if len(unlisted) > 5 else "")
        raise Conflict(
            f"developer build of signer {signer.name!r} may only target its {len(listed)} listed "
            f"hardware IDs; {len(unlisted)} targeted devices are not listed ({shown}); "
            'narrow the filter, e.g. hardware_id in ["…", "…"]'
        )


TAG_KEYS_SHOWN = 50
"""At most this many of a tenant's tag keys are listed in a warning."""


def filter_warnings(s: Session, tenant_id: int, filter_text: str) -> list[str]:
    """Warnings about a campaign's filter: tag keys it names that no device of the tenant has."""
    named = filters.tag_keys(filters.parse(filter_text))
    if not named:
        return []
    existing = tenant_tag_keys(s, tenant_id, TAG_KEYS_SHOWN + 1)
    missing = {k for k in named if k not in existing and not _has_tag(s, tenant_id, k)}
    if not missing:
        return []
    return unknown_tag_warnings(missing, set(existing[:TAG_KEYS_SHOWN]), len(existing) > TAG_KEYS_SHOWN)


def _has_tag(s: Session, tenant_id: int, key: str) -> bool:
    """Whether any device of the tenant has tag ``key`` (the listed keys may be cut short)."""
    found = s.scalar(
        select(Device.id)
        .where(Device.tenant_id == tenant_id, Device.tags[key].as_string().is_not(None))
        .limit(1)
    )
    return found is not None


def tenant_tag_keys(s: Session, tenant_id: int, limit: int) -> list[str]:
    """The distinct tag keys of a tenant's devices, in order, at most ``limit``."""
    if s.get_bind().dialect.name == "postgresql":
        q = text(
            "SELECT DISTINCT k FROM devices CROSS JOIN LATERAL jsonb_object_keys(CAST(tags AS jsonb)) AS k "
            "WHERE tenant_id = :t AND jsonb_typeof(CAST(tags AS jsonb)) = 'object' ORDER BY k LIMIT :n"
        )
    else:
        q = text(
            "SELECT DISTINCT j.key FROM devices, json_each(devices.tags) AS j "
            "WHERE devices.tenant_id = :t AND json_type(devices.tags) = 'object' ORDER BY j.key LIMIT :n"
        )
    return [str(k) for k in s.scalars(q, {"t": tenant_id, "n": limit})]


def change_campaign(
    s: Session, tenant_id: int, campaign_id: int, action: str, reason: str | None = None
) -> Campaign:
    """Pause, resume or cancel; the engine notices the new state and acts on the devices."""
    campaign = get_campaign(s, tenant_id, campaign_id, lock=True)
    try:
        target = action_transition(campaign.state, action).value
    except InvalidTransition as exc:
        raise Conflict(f"campaign {campaign_id} {str(exc).removeprefix('campaign ')}") from None
    if action == "resume" and campaign.started_at is None:
        raise Conflict(f"campaign {campaign_id} was never started; use start")
    campaign.state = target
    if reason:
        campaign.stop_reason = reason
    _campaign_event(s, campaign, target, reason or f"{action} requested")
    s.flush()
    return campaign


def campaign_stats(s: Session, tenant_id: int, campaign_id: int, phase_names: PhaseNamer) -> dict[str, Any]:
    """Counts per deployment state and the most common failure results; ``phase_names``
    (``rollout.launch.phase_names``) labels the phases of the stored policy."""
    campaign = get_campaign(s, tenant_id, campaign_id)
    counts = dict.fromkeys(DEPLOYMENT_STATES, 0)
    for by_state in s.execute(
        select(Deployment.state, func.count().label("n"))
        .where(Deployment.tenant_id == tenant_id, Deployment.campaign_id == campaign_id)
        .group_by(Deployment.state)
    ):
        counts[by_state.state] = by_state.n
    phases: dict[int, dict[str, int]] = {}
    for by_phase in s.execute(
        select(Deployment.phase, Deployment.state, func.count().label("n"))
        .where(Deployment.tenant_id == tenant_id, Deployment.campaign_id == campaign_id)
        .group_by(Deployment.phase, Deployment.state)
    ):
        phases.setdefault(by_phase.phase, {})[by_phase.state] = by_phase.n
    failures = _by_result(s, tenant_id, campaign_id, AGAINST_ERRORS)
    skips = _by_result(s, tenant_id, campaign_id, NOT_FOR_ME)
    # Throughput: devices that reached a terminal state in the last minute; ETA from that pace.
    recent = (
        s.scalar(
            select(func.count()).where(
                Deployment.campaign_id == campaign_id,
                Deployment.state.in_(TERMINAL_STATES),
                Deployment.updated_at >= utcnow() - timedelta(seconds=60),
            )
        )
        or 0
    )
    remaining = sum(n for st, n in counts.items() if st not in TERMINAL_STATES)
    return {
        "id": campaign.id,
        "name": campaign.name,
        "state": campaign.state,
        "stop_reason": campaign.stop_reason,
        "note": campaign.note,
        "phase": campaign.phase,
        "total": campaign.total,
        "counts": counts,
        "phases": {str(k): v for k, v in sorted(phases.items())},
        "phase_names": phase_names(campaign.policy),
        "per_minute": recent,
        "eta_s": round(60.0 * remaining / recent, 1) if recent and campaign.state == "running" else None,
        "failures": failures,
        "skips": skips,
        "started_at": campaign.started_at,
        "finished_at": campaign.finished_at,
        "consent": _consent_stats(campaign, counts, s) if campaign.consent is not None else None,
    }


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


def campaign_events(s: Session, tenant_id: int, campaign_id: int) -> Sequence[CampaignEvent]:
    get_campaign(s, tenant_id, campaign_id)
    return s.scalars(
        select(CampaignEvent)
        .where(CampaignEvent.tenant_id == tenant_id, CampaignEvent.campaign_id == campaign_id)
        .order_by(CampaignEvent.id)
    ).all()


def join_new_devices(s: Session, campaign_id: int, tenant_id: int, phase: int) -> int:
    """Dynamic membership: add devices that match the campaign's filter but are not in it yet."""
    campaign = get_campaign(s, tenant_id, campaign_id)
    cond = and_(
        Device.tenant_id == tenant_id,
        filter_clause(filters.parse(campaign.filter)),
        ~select(Deployment.device_id)
        .where(Deployment.campaign_id == campaign_id, Deployment.device_id == Device.id)
        .exists(),
    )
    stmt = _deployments_of(campaign_id, tenant_id, literal(phase), cond).returning(Deployment.device_id)
    added = len(s.execute(stmt).all())
    if added:
        campaign.total += added
        _campaign_event(s, campaign, campaign.state, f"{added} newly registered devices joined")
        log.info("campaign %d: %d newly registered devices joined", campaign_id, added)
    return added
