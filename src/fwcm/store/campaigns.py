"""Campaigns of a tenant: create, clone, start (freeze the matching devices), pause, resume,
cancel, retry the failed devices, delete, status, and the devices that join a dynamic campaign later.

The rules come from the caller: a campaign is created from a checked draft and started by a plan
(``fwcm.rollout.launch``); this module stores them.  Every function takes the caller's
``tenant_id`` and filters on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Insert,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from fwcm import filters
from fwcm.errors import Conflict, Invalid, NotFound
from fwcm.rollout.groups import Member
from fwcm.rollout.launch import (
    CampaignDraft,
    StartPlanner,
    empty_refusal,
    unknown_tag_warnings,
)
from fwcm.rollout.states import (
    CAMPAIGN_TERMINAL,
    RETRIED,
    CampaignState,
    DeviceState,
    InvalidTransition,
    action_transition,
    retry_transition,
)
from fwcm.store import counts
from fwcm.store.db import execute_many
from fwcm.store.devices import IN_SERVICE
from fwcm.store.filtersql import filter_clause
from fwcm.store.images import get_manifest
from fwcm.store.models import (
    AccountingRecord,
    Campaign,
    CampaignEvent,
    Deployment,
    Device,
    Manifest,
    Signer,
    utcnow,
)
from fwcm.store.paging import page

Reviewer = Callable[[Iterable[tuple[int, str, int]], int], dict[str, Any]]
"""What resuming a stopped campaign accepts, from its (phase, state, count) rows and current phase
(``rollout.planner.review``)."""

log = logging.getLogger(__name__)
_DEPLOYMENTS = cast(Table, Deployment.__table__)
_FREEZE = insert(_DEPLOYMENTS).values(
    campaign_id=bindparam("c"),
    device_id=bindparam("d"),
    tenant_id=bindparam("t"),
    state=bindparam("st"),
    result=bindparam("r"),
    phase=bindparam("p"),
    attempt=bindparam("a"),
    last_seq=bindparam("q"),
)
"""One device frozen into a starting campaign (execute_many: a start inserts one row per device)."""


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


def list_campaigns(
    s: Session, tenant_id: int, state: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[int, Sequence[Campaign]]:
    """A page of the tenant's campaigns (optionally in one state), oldest first, and how many."""
    q = select(Campaign).where(Campaign.tenant_id == tenant_id)
    if state:
        q = q.where(Campaign.state == state)
    return page(s, q.order_by(Campaign.id), limit, offset)


def get_campaign(s: Session, tenant_id: int, campaign_id: int, *, lock: bool = False) -> Campaign:
    q = select(Campaign).where(Campaign.tenant_id == tenant_id, Campaign.id == campaign_id)
    if lock:
        q = q.with_for_update()
    campaign = s.scalar(q)
    if campaign is None:
        raise NotFound(f"campaign {campaign_id} not found")
    return campaign


def _campaign_event(
    s: Session, campaign: Campaign, state: str, reason: str | None, kind: str | None = None
) -> None:
    s.add(
        CampaignEvent(
            tenant_id=campaign.tenant_id,
            campaign_id=campaign.id,
            at=utcnow(),
            state=state,
            reason=reason,
            kind=kind,
        )
    )


def targets(campaign: Campaign) -> ColumnElement[bool]:
    """The devices a campaign's start takes: the tenant's in-service devices its filter selects."""
    return and_(
        Device.tenant_id == campaign.tenant_id, IN_SERVICE, filter_clause(filters.parse(campaign.filter))
    )


def start_campaign(
    s: Session, tenant_id: int, campaign_id: int, plan: StartPlanner, *, allow_empty: bool = False
) -> Campaign:
    """Freeze the matching devices into deployments, each in its phase, and start running.

    ``plan`` (``rollout.launch.start_plan``) reads the stored policy: the phase of each device
    (``rollout.groups``: rollout groups by filter, the rest in the policy's order) and the state
    the campaign enters. A start over no device is refused (409) unless the campaign is dynamic or
    ``allow_empty`` says so.
    """
    campaign = get_campaign(s, tenant_id, campaign_id, lock=True)
    if campaign.state not in ("draft", "scheduled"):
        raise Conflict(
            f"campaign {campaign_id} is {campaign.state}; only a draft or scheduled campaign can start"
        )
    cond = targets(campaign)
    _check_signer_scope(s, campaign, cond)
    matching = s.scalar(select(func.count()).select_from(Device).where(cond)) or 0
    planned = plan(campaign.policy, matching, time.time())
    refused = empty_refusal(campaign.filter, matching, planned, allow_empty)
    if refused is not None:
        raise Conflict(f"campaign {campaign_id} not started: {refused}")
    group = _first_group(planned.groups)
    chosen = select(Device.id, group.label("grp")).where(cond).order_by(Device.id)
    members = [Member(row.id, row.grp) for row in s.connection().execute(chosen)]  # Core: no ORM rows
    phases = planned.assign(members, campaign.id)
    fixed = {"c": campaign.id, "t": tenant_id, "st": DeviceState.PENDING.value, "r": 0, "a": 0, "q": -1}
    rows = [{**fixed, "d": m.device_id, "p": phases[m.device_id]} for m in members]
    execute_many(s.connection(), _FREEZE, rows)
    total = len(rows)
    campaign.total = total
    if s.get_bind().dialect.name == "postgresql":
        # fresh rows: without statistics the planner scans pending rows once per notice batch
        s.execute(text("ANALYZE deployments"))
    campaign.state = planned.state
    campaign.phase = 0
    campaign.started_at = utcnow()
    _campaign_event(
        s,
        campaign,
        campaign.state,
        f"started with {total} devices; phases filled {planned.describe_order(campaign.id)}",
    )
    s.flush()
    log.info("campaign %d started over %d devices", campaign.id, total)
    return campaign


def _first_group(groups: dict[int, str]) -> ColumnElement[Any]:
    """SQL: the index of the first rollout group (filter phase) a device matches, else NULL."""
    whens = [(filter_clause(filters.parse(text)), i) for i, text in sorted(groups.items())]
    return case(*whens, else_=literal(None)) if whens else literal(None)


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
    s: Session,
    tenant_id: int,
    campaign_id: int,
    action: str,
    reason: str | None = None,
    *,
    review: Reviewer | None = None,
) -> Campaign:
    """Pause, resume or cancel; the engine notices the new state and acts on the devices.

    Resuming a stopped campaign stores what ``review`` says the operator accepted, so the engine
    does not stop it again for the same failures.
    """
    campaign = get_campaign(s, tenant_id, campaign_id, lock=True)
    try:
        target = action_transition(campaign.state, action).value
    except InvalidTransition as exc:
        raise Conflict(f"campaign {campaign_id} {str(exc).removeprefix('campaign ')}") from None
    if action == "resume" and campaign.started_at is None:
        raise Conflict(f"campaign {campaign_id} was never started; use start")
    if campaign.state == CampaignState.STOPPED.value:
        rows = counts.phase_counts(s, campaign.id)
        campaign.reviewed = review(rows, campaign.phase) if review is not None else None
        _run_again(campaign)
    campaign.state = target
    if reason:
        campaign.stop_reason = reason
    _campaign_event(s, campaign, target, reason or f"{action} requested")
    s.flush()
    return campaign


def _run_again(campaign: Campaign) -> None:
    """An ended campaign runs again: not finished, no stop reason (its events keep the old one)."""
    campaign.finished_at = None
    campaign.stop_reason = None
    campaign.note = None


def retry_failed(s: Session, tenant_id: int, campaign_id: int) -> tuple[Campaign, int]:
    """Give the failed and timed-out devices of a campaign a new attempt: they are pending again
    and their next notice carries the next attempt number, so reports of the old one are ignored.
    An ended campaign runs again; the campaign and the number of devices retried."""
    campaign = get_campaign(s, tenant_id, campaign_id, lock=True)
    try:
        target = retry_transition(campaign.state)
    except InvalidTransition as exc:
        raise Conflict(f"campaign {campaign_id} {str(exc).removeprefix('campaign ')}") from None
    retried = s.execute(
        update(Deployment)
        .where(Deployment.campaign_id == campaign.id, Deployment.state.in_([st.value for st in RETRIED]))
        .values(
            state=DeviceState.PENDING.value,
            result=0,
            detail=None,
            progress=None,
            retry_at=None,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if not retried:
        raise Conflict(f"campaign {campaign_id} has no failed or timed-out devices to retry")
    if target.value != campaign.state:
        _run_again(campaign)
        campaign.state = target.value
    campaign.reviewed = None  # the failures it accepted are being retried
    why = f"retry: {retried} failed and timed-out devices get a new attempt"
    _campaign_event(s, campaign, campaign.state, why)
    s.flush()
    log.info("campaign %d: %d failed devices retried", campaign.id, retried)
    return campaign, int(retried)


def clone_campaign(s: Session, tenant_id: int, campaign_id: int, name: str) -> Campaign:
    """A new draft with the same manifest, filter, policy, attestation and consent rules."""
    source = get_campaign(s, tenant_id, campaign_id)
    clone = Campaign(
        tenant_id=tenant_id,
        name=name,
        manifest_id=source.manifest_id,
        filter=source.filter,
        policy=dict(source.policy or {}),
        attestation=source.attestation,
        consent=dict(source.consent) if source.consent is not None else None,
        state=CampaignState.DRAFT.value,
        phase=0,
        total=0,
    )
    s.add(clone)
    s.flush()
    _campaign_event(s, clone, CampaignState.DRAFT.value, f"cloned from campaign {source.id}")
    return clone


def delete_campaign(s: Session, tenant_id: int, campaign_id: int) -> None:
    """Delete a draft or an ended campaign with its deployments, events and usage records (device
    histories keep their lines); a live one is refused."""
    campaign = get_campaign(s, tenant_id, campaign_id, lock=True)
    state = CampaignState(campaign.state)
    if state not in CAMPAIGN_TERMINAL and state != CampaignState.DRAFT:
        raise Conflict(
            f"campaign {campaign_id} is {state.value}; only a draft or an ended campaign can be "
            "deleted (cancel it first)"
        )
    if state == CampaignState.CANCELLED and campaign.finished_at is None:
        raise Conflict(f"campaign {campaign_id} is still withdrawing its notices; try again shortly")
    s.execute(delete(Deployment).where(Deployment.campaign_id == campaign.id))
    s.execute(delete(CampaignEvent).where(CampaignEvent.campaign_id == campaign.id))
    s.execute(delete(AccountingRecord).where(AccountingRecord.campaign_id == campaign.id))
    s.delete(campaign)
    s.flush()
    log.info("tenant %d deleted campaign %d", tenant_id, campaign_id)


def join_new_devices(s: Session, campaign_id: int, tenant_id: int, phase: int) -> int:
    """Dynamic membership: add devices that match the campaign's filter but are not in it yet."""
    campaign = get_campaign(s, tenant_id, campaign_id)
    cond = and_(
        Device.tenant_id == tenant_id,
        IN_SERVICE,
        filter_clause(filters.parse(campaign.filter)),
        ~select(Deployment.device_id)
        .where(Deployment.campaign_id == campaign_id, Deployment.device_id == Device.id)
        .exists(),
    )
    stmt = _deployments_of(campaign_id, tenant_id, literal(phase), cond).returning(Deployment.device_id)
    added = len(s.execute(stmt).all())
    if added:
        campaign.total += added
        _campaign_event(s, campaign, campaign.state, f"{added} newly registered devices joined", "note")
        log.info("campaign %d: %d newly registered devices joined", campaign_id, added)
    return added
