"""Queries of the campaign engine and report ingest: set-based, one transaction per call."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, tuple_, update
from sqlalchemy.orm import Session

from fwcm.protocol import Report, Result
from fwcm.rollout.states import (
    DEVICE_TERMINAL,
    CampaignState,
    DeploymentView,
    DeviceState,
    apply_report,
)
from fwcm.store.models import Campaign, CampaignEvent, Deployment, Device, DeviceEvent, Manifest, Tenant

HISTORY_PER_DEVICE = 50
"""Device history kept per device; older events are trimmed (bounded growth)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DeviceKey:
    device_pk: int
    tenant_id: int
    secret: bytes


@dataclass(frozen=True)
class Target:
    """A device about to receive a notice for one campaign attempt."""

    device_pk: int
    tenant: str
    name: str
    transport: str
    secret: bytes
    attempt: int


@dataclass(frozen=True)
class LeasedCampaign:
    id: int
    tenant_id: int
    state: str
    policy: dict[str, object]
    manifest_id: int


def lease_campaigns(s: Session, owner: str, lease_s: float) -> list[LeasedCampaign]:
    """Take (or renew) the lease of every active campaign no other live replica holds."""
    now = utcnow()
    active = [CampaignState.RUNNING.value, CampaignState.PAUSED.value, CampaignState.SCHEDULED.value]
    claimable = and_(
        Campaign.state.in_(active),
        or_(Campaign.lease_owner.is_(None), Campaign.lease_owner == owner, Campaign.lease_until < now),
    )
    rows = s.execute(
        update(Campaign)
        .where(claimable)
        .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease_s))
        .returning(Campaign.id, Campaign.tenant_id, Campaign.state, Campaign.policy, Campaign.manifest_id)
    ).all()
    return [LeasedCampaign(r[0], r[1], r[2], r[3] or {}, r[4]) for r in rows]


def release_leases(s: Session, owner: str) -> None:
    s.execute(
        update(Campaign).where(Campaign.lease_owner == owner).values(lease_owner=None, lease_until=None)
    )


def counts(s: Session, campaign_id: int) -> Counter[str]:
    rows = s.execute(
        select(Deployment.state, func.count())
        .where(Deployment.campaign_id == campaign_id)
        .group_by(Deployment.state)
    ).all()
    return Counter({state: n for state, n in rows})


def take_pending(s: Session, campaign_id: int, limit: int) -> list[Target]:
    """Mark up to ``limit`` pending deployments notified (new attempt) and return them."""
    if limit <= 0:
        return []
    rows = s.execute(
        select(
            Deployment.device_id,
            Deployment.attempt,
            Tenant.slug,
            Device.name,
            Device.transport,
            Device.secret,
        )
        .join(Device, Device.id == Deployment.device_id)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .where(Deployment.campaign_id == campaign_id, Deployment.state == DeviceState.PENDING.value)
        .order_by(Deployment.device_id)
        .limit(limit)
    ).all()
    if not rows:
        return []
    now = utcnow()
    s.connection().execute(
        update(Deployment)
        .where(
            Deployment.campaign_id == campaign_id,
            Deployment.device_id == bindparam("d"),
            Deployment.state == DeviceState.PENDING.value,
        )
        .values(
            state=DeviceState.NOTIFIED.value,
            attempt=bindparam("a"),
            last_seq=-1,
            notified_at=now,
            updated_at=now,
        ),
        [{"d": r[0], "a": r[1] + 1} for r in rows],
    )
    return [Target(r[0], r[2], r[3], r[4], r[5], r[1] + 1) for r in rows]


def in_flight(s: Session, campaign_id: int, states: Iterable[str]) -> list[Target]:
    """Deployments in the given states, for re-sending or withdrawing their notice."""
    rows = s.execute(
        select(
            Deployment.device_id,
            Deployment.attempt,
            Tenant.slug,
            Device.name,
            Device.transport,
            Device.secret,
        )
        .join(Device, Device.id == Deployment.device_id)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .where(Deployment.campaign_id == campaign_id, Deployment.state.in_(list(states)))
    ).all()
    return [Target(r[0], r[2], r[3], r[4], r[5], r[1]) for r in rows]


def cancel_pending(s: Session, campaign_id: int) -> int:
    now = utcnow()
    res = s.execute(
        update(Deployment)
        .where(Deployment.campaign_id == campaign_id, Deployment.state == DeviceState.PENDING.value)
        .values(state=DeviceState.CANCELLED.value, result=int(Result.CANCELLED), updated_at=now)
    )
    return int(res.rowcount or 0)  # type: ignore[attr-defined]


def set_campaign_state(
    s: Session, campaign: int, tenant_id: int, state: CampaignState, reason: str | None
) -> None:
    now = utcnow()
    values: dict[str, object] = {"state": state.value, "stop_reason": reason}
    if state in (CampaignState.COMPLETED, CampaignState.CANCELLED, CampaignState.STOPPED):
        values.update(finished_at=now, lease_owner=None, lease_until=None)
    s.execute(update(Campaign).where(Campaign.id == campaign).values(**values))
    s.add(CampaignEvent(tenant_id=tenant_id, campaign_id=campaign, at=now, state=state.value, reason=reason))


def manifest_envelope(s: Session, manifest_id: int) -> bytes:
    return s.execute(select(Manifest.envelope).where(Manifest.id == manifest_id)).scalar_one()


def device_keys(s: Session, names: Iterable[tuple[str, str]]) -> dict[tuple[str, str], DeviceKey]:
    """Look up devices by (tenant slug, device name), in one query."""
    wanted = list(set(names))
    if not wanted:
        return {}
    rows = s.execute(
        select(Tenant.slug, Device.name, Device.id, Device.tenant_id, Device.secret)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .where(tuple_(Tenant.slug, Device.name).in_(wanted))
    ).all()
    return {(r[0], r[1]): DeviceKey(r[2], r[3], r[4]) for r in rows}


@dataclass(frozen=True)
class Verified:
    key: DeviceKey
    report: Report


def apply_reports(s: Session, batch: Sequence[Verified]) -> tuple[int, set[int]]:
    """Apply a batch of verified reports in the caller's transaction.

    Returns the number of deployments changed and the campaigns they belong to.
    """
    now = utcnow()
    hello = [v for v in batch if v.report.campaign == 0]
    for v in hello:
        values: dict[str, object] = {"last_seen": now, "online": True}
        if v.report.installed_sequence is not None:
            values["sequence"] = v.report.installed_sequence
        s.execute(update(Device).where(Device.id == v.key.device_pk).values(**values))

    reports = [v for v in batch if v.report.campaign != 0]
    if not reports:
        return 0, set()
    pairs = {(v.report.campaign, v.key.device_pk) for v in reports}
    rows = s.execute(
        select(
            Deployment.campaign_id,
            Deployment.device_id,
            Deployment.state,
            Deployment.attempt,
            Deployment.last_seq,
        ).where(tuple_(Deployment.campaign_id, Deployment.device_id).in_(list(pairs)))
    ).all()
    current = {(r[0], r[1]): DeploymentView(DeviceState(r[2]), r[3], r[4]) for r in rows}

    updates: list[dict[str, object]] = []
    events: list[dict[str, object]] = []
    succeeded: list[dict[str, object]] = []
    for v in sorted(reports, key=lambda v: v.report.seq):
        k = (v.report.campaign, v.key.device_pk)
        view = current.get(k)
        if view is None:
            continue
        change = apply_report(view, v.report)
        if change is None:
            continue
        current[k] = DeploymentView(change.state, view.attempt, change.seq)
        updates.append(
            {
                "c": k[0],
                "d": k[1],
                "st": change.state.value,
                "r": change.result,
                "q": change.seq,
                "a": view.attempt,
                "p": v.report.progress,
                "dt": v.report.detail,
            }
        )
        if change.state != view.state:
            events.append(
                {
                    "tenant_id": v.key.tenant_id,
                    "campaign_id": k[0],
                    "device_id": k[1],
                    "at": now,
                    "state": change.state.value,
                    "result": change.result,
                    "detail": v.report.detail,
                }
            )
        if change.state == DeviceState.SUCCEEDED and v.report.installed_sequence is not None:
            succeeded.append({"d": k[1], "sq": v.report.installed_sequence})
    if updates:
        s.connection().execute(
            update(Deployment)
            .where(
                Deployment.campaign_id == bindparam("c"),
                Deployment.device_id == bindparam("d"),
                Deployment.attempt == bindparam("a"),
                Deployment.last_seq < bindparam("q"),
            )
            .values(
                state=bindparam("st"),
                result=bindparam("r"),
                last_seq=bindparam("q"),
                progress=bindparam("p"),
                detail=bindparam("dt"),
                updated_at=now,
            ),
            updates,
        )
    if events:
        s.execute(insert(DeviceEvent), events)
    if succeeded:
        s.connection().execute(
            update(Device).where(Device.id == bindparam("d")).values(sequence=bindparam("sq"), last_seen=now),
            succeeded,
        )
    return len(updates), {int(u["c"]) for u in updates}  # type: ignore[call-overload]


def set_presence(s: Session, device_pks: dict[int, bool]) -> None:
    now = utcnow()
    if device_pks:
        s.connection().execute(
            update(Device).where(Device.id == bindparam("d")).values(online=bindparam("o"), last_seen=now),
            [{"d": d, "o": o} for d, o in device_pks.items()],
        )


def trim_history(s: Session, keep: int = HISTORY_PER_DEVICE) -> int:
    """Delete device events beyond the newest ``keep`` per device."""
    ranked = select(
        DeviceEvent.id,
        func.row_number()
        .over(partition_by=DeviceEvent.device_id, order_by=DeviceEvent.id.desc())
        .label("rn"),
    ).subquery()
    old = select(ranked.c.id).where(ranked.c.rn > keep)
    res = s.execute(delete(DeviceEvent).where(DeviceEvent.id.in_(old)))
    return int(res.rowcount or 0)  # type: ignore[attr-defined]


def active_notice(s: Session, tenant: str, device: str) -> tuple[int, Target, int, str] | None:
    """The newest in-flight deployment of a device: (campaign, target, manifest id, campaign state)."""
    row = s.execute(
        select(
            Deployment.campaign_id,
            Deployment.device_id,
            Deployment.attempt,
            Device.transport,
            Device.secret,
            Campaign.manifest_id,
            Campaign.state,
        )
        .join(Device, Device.id == Deployment.device_id)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .join(Campaign, Campaign.id == Deployment.campaign_id)
        .where(
            Tenant.slug == tenant,
            Device.name == device,
            Deployment.state.notin_([st.value for st in DEVICE_TERMINAL] + [DeviceState.PENDING.value]),
            Campaign.state.in_(
                [CampaignState.RUNNING.value, CampaignState.PAUSED.value, CampaignState.CANCELLED.value]
            ),
        )
        .order_by(Deployment.campaign_id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    target = Target(row[1], tenant, device, row[3], row[4], row[2])
    return row[0], target, row[5], row[6]


def cancelled_unsettled(s: Session, owner: str, lease_s: float) -> list[tuple[int, int, int]]:
    """Claim cancelled campaigns whose notices were not yet withdrawn: (id, tenant, manifest)."""
    now = utcnow()
    rows = s.execute(
        update(Campaign)
        .where(
            Campaign.state == CampaignState.CANCELLED.value,
            Campaign.finished_at.is_(None),
            or_(Campaign.lease_owner.is_(None), Campaign.lease_owner == owner, Campaign.lease_until < now),
        )
        .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease_s))
        .returning(Campaign.id, Campaign.tenant_id, Campaign.manifest_id)
    ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def settle_cancel(s: Session, campaign_id: int) -> None:
    s.execute(
        update(Campaign)
        .where(Campaign.id == campaign_id)
        .values(finished_at=utcnow(), lease_owner=None, lease_until=None)
    )
