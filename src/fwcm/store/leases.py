"""Campaigns as the engine runs them, as stored: leases between replicas, state, phase and note,
events, and cancellations to settle."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Row,
    and_,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from fwcm.rollout.states import CampaignState
from fwcm.store.db import aware, utcnow
from fwcm.store.models import (
    Campaign,
    CampaignEvent,
    Manifest,
)


@dataclass(frozen=True)
class LeasedCampaign:
    id: int
    tenant_id: int
    state: str
    policy: dict[str, object]
    manifest_id: int
    phase: int
    attestation: bool = False
    consent: dict[str, object] | None = None
    consent_stage: str | None = None
    started_at: datetime | None = None
    granted_at: datetime | None = None
    group_decision: str | None = None
    name: str = ""
    reviewed: dict[str, object] | None = None
    """What an operator accepted when resuming it after a stop (``rollout.planner.review``)."""


_LEASE_COLUMNS = (
    Campaign.id,
    Campaign.tenant_id,
    Campaign.state,
    Campaign.policy,
    Campaign.manifest_id,
    Campaign.phase,
    Campaign.attestation,
    Campaign.consent,
    Campaign.consent_stage,
    Campaign.started_at,
    Campaign.granted_at,
    Campaign.group_decision,
    Campaign.name,
    Campaign.reviewed,
)


ACTIVE = (CampaignState.RUNNING.value, CampaignState.PAUSED.value, CampaignState.SCHEDULED.value)
"""Campaign states the engine works on."""


def _claim(s: Session, owner: str, lease_s: float, which: ColumnElement[bool], *columns: Any) -> list[Any]:
    """Take (or renew) the lease of the campaigns ``which`` selects that no other live replica
    holds; returns their ``columns``."""
    now = utcnow()
    free = or_(Campaign.lease_owner.is_(None), Campaign.lease_owner == owner, Campaign.lease_until < now)
    where = _skip_locked(s, and_(which, free))
    if where is None:
        return []
    lease = {"lease_owner": owner, "lease_until": now + timedelta(seconds=lease_s)}
    return list(s.execute(update(Campaign).where(where).values(**lease).returning(*columns)).all())


def lease_campaigns(s: Session, owner: str, lease_s: float) -> list[LeasedCampaign]:
    """Take (or renew) the lease of every active campaign no other live replica holds."""
    return [_leased(r) for r in _claim(s, owner, lease_s, Campaign.state.in_(ACTIVE), *_LEASE_COLUMNS)]


def _skip_locked(s: Session, claimable: ColumnElement[bool]) -> ColumnElement[bool] | None:
    """What a claiming UPDATE of campaigns may touch (None: nothing).

    On PostgreSQL the claimable rows are locked first with ``FOR UPDATE SKIP LOCKED``: replicas
    claiming at the same moment each take different rows and never wait on one another (a plain
    UPDATE would queue behind the other replica's row locks). The UPDATE keeps ``claimable``, so a
    row changed since it was read is not taken. SQLite has a single writer (``BEGIN IMMEDIATE``)
    and no row locks: there the UPDATE alone is the claim.
    """
    if s.get_bind().dialect.name != "postgresql":
        return claimable
    ids = list(s.scalars(select(Campaign.id).where(claimable).with_for_update(skip_locked=True)))
    return and_(Campaign.id.in_(ids), claimable) if ids else None


def _leased(r: Row[Any]) -> LeasedCampaign:
    return LeasedCampaign(
        id=r.id,
        tenant_id=r.tenant_id,
        state=r.state,
        policy=r.policy or {},
        manifest_id=r.manifest_id,
        phase=r.phase,
        attestation=bool(r.attestation),
        consent=r.consent,
        consent_stage=r.consent_stage,
        started_at=_maybe_aware(r.started_at),
        granted_at=_maybe_aware(r.granted_at),
        group_decision=r.group_decision,
        name=r.name,
        reviewed=r.reviewed,
    )


def _maybe_aware(t: datetime | None) -> datetime | None:
    return None if t is None else aware(t)


def held_campaigns(s: Session, ids: list[int], owner: str) -> list[LeasedCampaign]:
    """The active campaigns among ``ids`` still leased to ``owner``, freshly read (no write)."""
    rows = s.execute(
        select(*_LEASE_COLUMNS).where(
            Campaign.id.in_(ids), Campaign.lease_owner == owner, Campaign.state.in_(ACTIVE)
        )
    ).all()
    return [_leased(r) for r in rows]


def release_leases(s: Session, owner: str) -> None:
    s.execute(
        update(Campaign).where(Campaign.lease_owner == owner).values(lease_owner=None, lease_until=None)
    )


def set_note(s: Session, campaign_id: int, note: str | None) -> None:
    s.execute(update(Campaign).where(Campaign.id == campaign_id).values(note=note))


def set_phase(s: Session, campaign_id: int, tenant_id: int, phase: int, label: str) -> None:
    s.execute(update(Campaign).where(Campaign.id == campaign_id).values(phase=phase))
    s.add(
        CampaignEvent(
            tenant_id=tenant_id,
            campaign_id=campaign_id,
            at=utcnow(),
            state="running",
            reason=f"{label} begins",
            kind="phase",
        )
    )


def unchanged_since_lease(s: Session, c: LeasedCampaign) -> bool:
    """Lock the campaign row and say whether its state and phase are still what the lease read.

    An operator's pause, resume or cancel may commit between the engine's lease and its write of
    a plan made from the older state; that plan is dropped (the next step plans again), so the
    engine never overwrites the operator's change or notifies devices of a campaign cancelled
    meanwhile. On SQLite the write transaction already holds the one write lock.
    """
    row = s.execute(
        select(Campaign.state, Campaign.phase).where(Campaign.id == c.id).with_for_update()
    ).one_or_none()
    return row is not None and row.state == c.state and row.phase == c.phase


def set_campaign_state(
    s: Session, campaign: int, tenant_id: int, state: CampaignState, reason: str | None
) -> None:
    now = utcnow()
    values: dict[str, object] = {"state": state.value, "stop_reason": reason, "note": None}
    if state in (CampaignState.COMPLETED, CampaignState.CANCELLED, CampaignState.STOPPED):
        values.update(finished_at=now, lease_owner=None, lease_until=None)
    s.execute(update(Campaign).where(Campaign.id == campaign).values(**values))
    s.add(CampaignEvent(tenant_id=tenant_id, campaign_id=campaign, at=now, state=state.value, reason=reason))


def add_campaign_event(s: Session, campaign: int, tenant_id: int, state: str, reason: str) -> None:
    """Something happened to a campaign without changing its state (a ``note``)."""
    s.add(
        CampaignEvent(
            tenant_id=tenant_id, campaign_id=campaign, at=utcnow(), state=state, reason=reason, kind="note"
        )
    )


def manifest_envelope(s: Session, manifest_id: int) -> bytes:
    return s.execute(select(Manifest.envelope).where(Manifest.id == manifest_id)).scalar_one()


def campaign_policy_rows(s: Session, campaign_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """The stored policies of campaigns, as stored."""
    rows = s.execute(select(Campaign.id, Campaign.policy).where(Campaign.id.in_(list(set(campaign_ids)))))
    return {r.id: r.policy or {} for r in rows}


def cancelled_unsettled(s: Session, owner: str, lease_s: float) -> list[tuple[int, int, int]]:
    """Claim cancelled campaigns whose notices were not yet withdrawn: (id, tenant, manifest)."""
    unsettled = and_(Campaign.state == CampaignState.CANCELLED.value, Campaign.finished_at.is_(None))
    rows = _claim(s, owner, lease_s, unsettled, Campaign.id, Campaign.tenant_id, Campaign.manifest_id)
    return [(r.id, r.tenant_id, r.manifest_id) for r in rows]


def settle_cancel(s: Session, campaign_id: int) -> None:
    s.execute(
        update(Campaign)
        .where(Campaign.id == campaign_id)
        .values(finished_at=utcnow(), lease_owner=None, lease_until=None)
    )
