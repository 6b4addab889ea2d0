"""What the operator console reads beyond the API's queries: the signed-in key by id, a cheap
fingerprint of a campaign for its live page, failure breakdowns, completions over time and a
device's deployments across campaigns.  SQL only; every function filters on the tenant.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from fwcm.errors import NotFound
from fwcm.rollout.states import DeviceState
from fwcm.store import counts
from fwcm.store.models import (
    ApiKey,
    Campaign,
    CampaignEvent,
    Deployment,
    Device,
    Signer,
    Tenant,
)


def key_by_id(s: Session, key_id: int) -> tuple[ApiKey, Tenant] | None:
    """A signed-in session's key and tenant (usable or not: the caller checks)."""
    row = s.execute(
        select(ApiKey, Tenant).join(Tenant, ApiKey.tenant_id == Tenant.id).where(ApiKey.id == key_id)
    ).first()
    return None if row is None else (row.ApiKey, row.Tenant)


def fingerprint(s: Session, tenant_id: int, campaign_id: int) -> tuple[Any, ...]:
    """Changes whenever the campaign's page would: its row, its newest campaign event and, per
    device state, the newest change of a deployment in it.

    Index lookups only (one per state on the (campaign_id, state, updated_at) index), whatever
    the campaign's size: the live page compares this every second and only then reads the counts.
    """
    row = s.execute(
        select(
            Campaign.state,
            Campaign.phase,
            Campaign.note,
            Campaign.total,
            Campaign.stop_reason,
            Campaign.finished_at,
        ).where(Campaign.id == campaign_id, Campaign.tenant_id == tenant_id)
    ).first()
    if row is None:
        raise NotFound(f"campaign {campaign_id} not found")
    newest = [
        select(func.max(Deployment.updated_at))
        .where(Deployment.campaign_id == campaign_id, Deployment.state == state.value)
        .scalar_subquery()
        for state in DeviceState
    ]
    last_change = select(func.max(CampaignEvent.id)).where(CampaignEvent.campaign_id == campaign_id)
    changes = s.execute(select(last_change.scalar_subquery(), *newest)).one()
    return (*tuple(row), *tuple(changes))


BREAKDOWNS = ("class_id", "hardware_id", "version")
"""Device attributes the failures are counted by."""


def failures_by(
    s: Session, tenant_id: int, campaign_id: int, states: Iterable[str], limit: int = 20
) -> dict[str, list[dict[str, Any]]]:
    """Devices of the campaign in ``states`` counted by each device attribute of ``BREAKDOWNS``,
    most common first (then by value): one GROUP BY over the failed rows (the
    (campaign_id, state, …) index bounds it) for the three breakdowns."""
    attrs: list[ColumnElement[Any]] = [getattr(Device, column).label(column) for column in BREAKDOWNS]
    rows = s.execute(
        select(*attrs, func.count().label("n"))
        .select_from(Deployment)
        .join(Device, Device.id == Deployment.device_id)
        .where(
            _owned(tenant_id, campaign_id),
            Deployment.state.in_(sorted(states)),
        )
        .group_by(*attrs)
    ).all()
    out: dict[str, list[dict[str, Any]]] = {}
    for column in BREAKDOWNS:
        tally: Counter[Any] = Counter()
        for r in rows:
            tally[r._mapping[column]] += r.n
        ranked = sorted(tally.items(), key=lambda kv: (-kv[1], kv[0] is None, str(kv[0])))
        out[column] = [{"value": value, "count": n} for value, n in ranked[:limit]]
    return out


def _owned(tenant_id: int, campaign_id: int) -> ColumnElement[bool]:
    """Deployments of the campaign if it is the tenant's: a constant subquery, so the count keeps
    to the (campaign_id, state, updated_at) index rather than reading every row for tenant_id."""
    owned = select(Campaign.id).where(Campaign.id == campaign_id, Campaign.tenant_id == tenant_id)
    return Deployment.campaign_id == owned.scalar_subquery()


@dataclass(frozen=True)
class Bucket:
    start: float
    """POSIX seconds at which the bucket starts."""
    state: str
    count: int


def completions_over_time(
    s: Session, tenant_id: int, campaign_id: int, states: Iterable[str], since: datetime, bucket_s: int
) -> list[Bucket]:
    """Devices that reached one of ``states`` since the minute of ``since``, per ``bucket_s`` and
    state: summed from the campaign's counts per minute (``store.counts``), not its deployments."""
    owned = s.scalar(select(Campaign.id).where(Campaign.id == campaign_id, Campaign.tenant_id == tenant_id))
    if owned is None:
        return []
    return [
        Bucket(start, state, n)
        for start, state, n in counts.completions(s, campaign_id, states, since, bucket_s)
    ]


def deployments(
    s: Session,
    tenant_id: int,
    campaign_id: int,
    *,
    states: Iterable[str] | None = None,
    result: int | None = None,
    where: dict[str, str | None] | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[int, list[dict[str, Any]]]:
    """A page of the campaign's deployments with their devices, by state, result code and device
    attributes (``class_id``, ``version``, ``hardware_id``), and how many match."""
    cond: list[ColumnElement[bool]] = [
        Deployment.tenant_id == tenant_id,
        Deployment.campaign_id == campaign_id,
    ]
    if states:
        cond.append(Deployment.state.in_(sorted(states)))
    if result is not None:
        cond.append(Deployment.result == result)
    for column, value in (where or {}).items():
        attr = getattr(Device, column)
        cond.append(attr.is_(None) if value is None else attr == value)
    base = select(Deployment, Device).join(Device, Device.id == Deployment.device_id).where(*cond)
    total = s.scalar(select(func.count()).select_from(base.subquery())) or 0
    rows = s.execute(base.order_by(Device.name).limit(limit).offset(offset)).all()
    return total, [{"deployment": r.Deployment, "device": r.Device} for r in rows]


def device_deployments(s: Session, tenant_id: int, device_id: int, limit: int = 50) -> list[dict[str, Any]]:
    """A device's deployments across campaigns, newest campaign first."""
    rows = s.execute(
        select(Deployment, Campaign.name, Campaign.state.label("campaign_state"))
        .join(Campaign, Campaign.id == Deployment.campaign_id)
        .where(Deployment.tenant_id == tenant_id, Deployment.device_id == device_id)
        .order_by(Deployment.campaign_id.desc())
        .limit(limit)
    ).all()
    return [
        {"deployment": r.Deployment, "campaign": r.name, "campaign_state": r.campaign_state} for r in rows
    ]


def signer_of(s: Session, tenant_id: int, signer_id: int | None) -> Signer | None:
    """The signer a manifest was verified against (None for an unsigned or foreign id)."""
    if signer_id is None:
        return None
    return s.scalar(select(Signer).where(Signer.id == signer_id, Signer.tenant_id == tenant_id))


def last_events(s: Session, tenant_id: int, campaign_id: int, limit: int = 50) -> list[CampaignEvent]:
    """The campaign's newest state changes, newest first."""
    return list(
        s.scalars(
            select(CampaignEvent)
            .where(CampaignEvent.tenant_id == tenant_id, CampaignEvent.campaign_id == campaign_id)
            .order_by(CampaignEvent.id.desc())
            .limit(limit)
        )
    )
