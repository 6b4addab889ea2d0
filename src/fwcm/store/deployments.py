"""Queries of the campaign engine and report ingest: set-based, one transaction per call."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Select, and_, bindparam, delete, func, insert, or_, select, tuple_, update
from sqlalchemy.orm import Session

from fwcm.protocol import Report, Result
from fwcm.rollout.policy import Policy
from fwcm.rollout.states import (
    DEVICE_TERMINAL,
    IN_PROGRESS,
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
    phase: int


_LEASE_COLUMNS = (
    Campaign.id,
    Campaign.tenant_id,
    Campaign.state,
    Campaign.policy,
    Campaign.manifest_id,
    Campaign.phase,
)


_ACTIVE = (CampaignState.RUNNING.value, CampaignState.PAUSED.value, CampaignState.SCHEDULED.value)
"""Campaign states the engine works on."""


def lease_campaigns(s: Session, owner: str, lease_s: float) -> list[LeasedCampaign]:
    """Take (or renew) the lease of every active campaign no other live replica holds."""
    now = utcnow()
    claimable = and_(
        Campaign.state.in_(_ACTIVE),
        or_(Campaign.lease_owner.is_(None), Campaign.lease_owner == owner, Campaign.lease_until < now),
    )
    rows = s.execute(
        update(Campaign)
        .where(claimable)
        .values(lease_owner=owner, lease_until=now + timedelta(seconds=lease_s))
        .returning(*_LEASE_COLUMNS)
    ).all()
    return [LeasedCampaign(r[0], r[1], r[2], r[3] or {}, r[4], r[5]) for r in rows]


def held_campaigns(s: Session, ids: list[int], owner: str) -> list[LeasedCampaign]:
    """The active campaigns among ``ids`` still leased to ``owner``, freshly read (no write)."""
    rows = s.execute(
        select(*_LEASE_COLUMNS).where(
            Campaign.id.in_(ids), Campaign.lease_owner == owner, Campaign.state.in_(_ACTIVE)
        )
    ).all()
    return [LeasedCampaign(r[0], r[1], r[2], r[3] or {}, r[4], r[5]) for r in rows]


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


def _targets() -> Select[int, int, str, str, str, bytes]:
    """Deployment rows with what a notice needs: device key, name, tenant slug and transport."""
    return (
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
    )


def take_pending(
    s: Session, campaign_id: int, limit: int, *, max_phase: int = 0, now: float | None = None
) -> list[Target]:
    """Mark up to ``limit`` pending deployments notified (new attempt) and return them.

    Only phases up to ``max_phase`` are eligible, and retries only once their backoff has passed.
    """
    if limit <= 0:
        return []
    when = utcnow() if now is None else datetime.fromtimestamp(now, UTC)
    rows = s.execute(
        _targets()
        .where(
            Deployment.campaign_id == campaign_id,
            Deployment.state == DeviceState.PENDING.value,
            Deployment.phase <= max_phase,
            or_(Deployment.retry_at.is_(None), Deployment.retry_at <= when),
        )
        .order_by(Deployment.phase, Deployment.device_id)
        .limit(limit)
    ).all()
    if not rows:
        return []
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
            notified_at=when,
            updated_at=when,
            retry_at=None,
        ),
        [{"d": r[0], "a": r[1] + 1} for r in rows],
    )
    return [Target(r[0], r[2], r[3], r[4], r[5], r[1] + 1) for r in rows]


def phase_counts(s: Session, campaign_id: int) -> list[tuple[int, str, int]]:
    """``(phase, state, count)`` rows: everything the rollout policy needs to decide."""
    rows = s.execute(
        select(Deployment.phase, Deployment.state, func.count())
        .where(Deployment.campaign_id == campaign_id)
        .group_by(Deployment.phase, Deployment.state)
    ).all()
    return [(int(p), str(st), int(n)) for p, st, n in rows]


def recent_notifications(s: Session, campaign_id: int, since: float) -> list[float]:
    """Notification times since ``since`` (epoch s), to restore the rate window after a restart."""
    rows = s.execute(
        select(Deployment.notified_at).where(
            Deployment.campaign_id == campaign_id,
            Deployment.notified_at >= datetime.fromtimestamp(since, UTC),
        )
    ).all()
    return [_epoch(r[0]) for r in rows if r[0] is not None]


def _epoch(t: datetime) -> float:
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


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
        )
    )


def expire_in_progress(s: Session, campaign_id: int, policy: Policy, now: float) -> int:
    """Deployments silent for longer than the device timeout: retried later, or timed out."""
    expired = 0
    when = datetime.fromtimestamp(now, UTC)
    for st in IN_PROGRESS:
        cutoff = policy.timeout_cutoff(st.value, now)
        if cutoff is None:
            continue
        rows = s.execute(
            select(Deployment.device_id, Deployment.attempt, Deployment.tenant_id).where(
                Deployment.campaign_id == campaign_id,
                Deployment.state == st.value,
                Deployment.updated_at <= datetime.fromtimestamp(cutoff, UTC),
            )
        ).all()
        for device_id, attempt, tenant_id in rows:
            at = policy.retry_at(None, attempt, now)
            new = DeviceState.PENDING if at is not None else DeviceState.TIMED_OUT
            s.execute(
                update(Deployment)
                .where(
                    Deployment.campaign_id == campaign_id,
                    Deployment.device_id == device_id,
                    Deployment.state == st.value,
                )
                .values(
                    state=new.value,
                    updated_at=when,
                    retry_at=datetime.fromtimestamp(at, UTC) if at is not None else None,
                    detail=f"no report for {policy.device_timeout_s:g} s while {st.value}",
                )
            )
            s.add(
                DeviceEvent(
                    tenant_id=tenant_id,
                    campaign_id=campaign_id,
                    device_id=device_id,
                    at=when,
                    state=DeviceState.TIMED_OUT.value,
                    result=0,
                    detail="retry scheduled" if at is not None else "timed out",
                )
            )
            expired += 1
    return expired


def in_flight(s: Session, campaign_id: int, states: Iterable[str]) -> list[Target]:
    """Deployments in the given states, for re-sending or withdrawing their notice."""
    rows = s.execute(
        _targets().where(Deployment.campaign_id == campaign_id, Deployment.state.in_(list(states)))
    ).all()
    return [Target(r[0], r[2], r[3], r[4], r[5], r[1]) for r in rows]


def cancel_not_started(s: Session, campaign_id: int) -> int:
    """Cancel deployments whose device has not reported any progress (pending or notified).

    A notified device still gets the cancel notice; whatever it reports afterwards changes nothing.
    """
    now = utcnow()
    not_started = [DeviceState.PENDING.value, DeviceState.NOTIFIED.value]
    res = s.execute(
        update(Deployment)
        .where(Deployment.campaign_id == campaign_id, Deployment.state.in_(not_started))
        .values(state=DeviceState.CANCELLED.value, result=int(Result.CANCELLED), updated_at=now)
    )
    return int(res.rowcount or 0)  # type: ignore[attr-defined]


def set_campaign_state(
    s: Session, campaign: int, tenant_id: int, state: CampaignState, reason: str | None
) -> None:
    now = utcnow()
    values: dict[str, object] = {"state": state.value, "stop_reason": reason, "note": None}
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


def campaign_policies(s: Session, campaign_ids: Iterable[int], cache: dict[int, Policy]) -> dict[int, Policy]:
    """Rollout policies of campaigns (they do not change once a campaign runs), cached."""
    missing = [c for c in set(campaign_ids) if c not in cache]
    if missing:
        for cid, policy in s.execute(select(Campaign.id, Campaign.policy).where(Campaign.id.in_(missing))):
            cache[cid] = Policy.from_dict(policy or {})
    return cache


def apply_reports(
    s: Session, batch: Sequence[Verified], policies: dict[int, Policy] | None = None
) -> tuple[int, set[int]]:
    """Apply a batch of verified reports in the caller's transaction.

    A transient failure (per the campaign's retry rules) puts the deployment back to pending with
    a retry time instead of failing it.  Returns the number of deployments changed and their
    campaigns.
    """
    now = utcnow()
    hellos = [
        {"d": v.key.device_pk, "sq": v.report.installed_sequence}
        for v in batch
        if v.report.campaign == 0 and v.report.installed_sequence is not None
    ]
    if hellos:
        s.connection().execute(
            update(Device)
            .where(Device.id == bindparam("d"))
            .values(sequence=bindparam("sq"), last_seen=now, online=True),
            hellos,
        )

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
    policies = campaign_policies(s, {c for c, _d in current}, {} if policies is None else policies)

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
        retry_at = None
        if change.state == DeviceState.FAILED:
            at = policies[k[0]].retry_at(change.result, view.attempt, now.timestamp())
            retry_at = datetime.fromtimestamp(at, UTC) if at is not None else None
        final = DeviceState.PENDING if retry_at is not None else change.state
        current[k] = DeploymentView(final, view.attempt, change.seq)
        updates.append(
            {
                "c": k[0],
                "d": k[1],
                "st": final.value,
                "r": change.result,
                "rt": retry_at,
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
                    "detail": v.report.detail if retry_at is None else f"retry at {retry_at:%H:%M:%S}",
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
                retry_at=bindparam("rt"),
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
