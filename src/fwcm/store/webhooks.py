"""Webhooks as stored: registration, leases between replicas, the events tailed from their
cursors, and deliveries with their last attempt.

The events are the rows the server writes in the transaction of each change (``campaign_events``,
``device_events``), read past each webhook's cursors: nothing has to be written twice, and a
delivery row plus the cursor move are committed together, so a restart neither loses nor repeats
an event. SQL only; the rules are in :mod:`fwcm.webhooks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from fwcm.errors import Conflict, NotFound
from fwcm.store.db import aware, utcnow
from fwcm.store.models import (
    Campaign,
    CampaignEvent,
    Device,
    DeviceEvent,
    Tenant,
    Webhook,
    WebhookAttempt,
    WebhookDelivery,
)
from fwcm.store.paging import page
from fwcm.webhooks import FAILED_STATES, CampaignEventRow, FailureRow

KEEP_DONE = 200
"""Delivered or failed deliveries kept per webhook (the delivery log); older ones are trimmed."""
MAX_PENDING = 1000
"""Deliveries a webhook may have waiting; beyond it the oldest are given up (a dead receiver
cannot make its queue grow without end)."""


@dataclass(frozen=True)
class HeldWebhook:
    """A webhook as the delivery worker uses it while it holds its lease."""

    id: int
    tenant_id: int
    tenant: str
    url: str
    secret: str
    events: list[str] | None
    campaign_cursor: int
    device_cursor: int
    flushed_at: datetime | None


# -- registration ------------------------------------------------------------------------------


def create(
    s: Session, tenant_id: int, url: str, events: list[str] | None, secret: str, per_tenant: int
) -> Webhook:
    """Register a webhook; it receives events recorded from now on."""
    count = s.scalar(select(func.count()).select_from(Webhook).where(Webhook.tenant_id == tenant_id)) or 0
    if count >= per_tenant:
        raise Conflict(f"a tenant may register at most {per_tenant} webhooks; remove one first")
    hook = Webhook(
        tenant_id=tenant_id,
        url=url,
        secret=secret,
        events=events,
        campaign_cursor=s.scalar(select(func.max(CampaignEvent.id))) or 0,
        device_cursor=s.scalar(select(func.max(DeviceEvent.id))) or 0,
        flushed_at=utcnow(),
    )
    s.add(hook)
    s.flush()
    return hook


def list_webhooks(s: Session, tenant_id: int, limit: int, offset: int) -> tuple[int, Sequence[Webhook]]:
    """A page of the tenant's webhooks, oldest first, and how many there are."""
    return page(s, select(Webhook).where(Webhook.tenant_id == tenant_id).order_by(Webhook.id), limit, offset)


def get(s: Session, tenant_id: int, webhook_id: int) -> Webhook:
    hook = s.scalar(select(Webhook).where(Webhook.tenant_id == tenant_id, Webhook.id == webhook_id))
    if hook is None:
        raise NotFound(f"webhook {webhook_id} not found")
    return hook


def remove(s: Session, tenant_id: int, webhook_id: int) -> None:
    """Delete a webhook and its deliveries (nothing more is sent to it)."""
    get(s, tenant_id, webhook_id)
    s.execute(delete(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id))
    s.execute(delete(Webhook).where(Webhook.id == webhook_id, Webhook.tenant_id == tenant_id))


def pending_counts(s: Session, webhook_ids: Sequence[int]) -> dict[int, int]:
    rows = s.execute(
        select(WebhookDelivery.webhook_id, func.count())
        .where(WebhookDelivery.webhook_id.in_(list(webhook_ids)), WebhookDelivery.state == "pending")
        .group_by(WebhookDelivery.webhook_id)
    ).all()
    return {r[0]: int(r[1]) for r in rows}


def deliveries(
    s: Session, tenant_id: int, webhook_id: int, limit: int, offset: int = 0
) -> tuple[int, Sequence[WebhookDelivery]]:
    """A page of the delivery log of one webhook of the tenant, newest first, and its length."""
    get(s, tenant_id, webhook_id)
    q = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
    return page(s, q.order_by(WebhookDelivery.id.desc()), limit, offset)


# -- leases ------------------------------------------------------------------------------------


def lease(s: Session, owner: str, lease_s: float) -> list[HeldWebhook]:
    """Take (or renew) the lease of every webhook no other live replica holds; returns them.

    On PostgreSQL the free rows are locked ``FOR UPDATE SKIP LOCKED`` first, so replicas claiming
    at once take different webhooks and never wait; SQLite has one writer."""
    now = utcnow()
    free = or_(Webhook.lease_owner.is_(None), Webhook.lease_owner == owner, Webhook.lease_until < now)
    if s.get_bind().dialect.name == "postgresql":
        ids = list(s.scalars(select(Webhook.id).where(free).with_for_update(skip_locked=True)))
        if not ids:
            return []
        free = and_(Webhook.id.in_(ids), free)
    until = now + timedelta(seconds=lease_s)
    s.execute(update(Webhook).where(free).values(lease_owner=owner, lease_until=until))
    return held(s, owner)


def held(s: Session, owner: str, webhook_id: int | None = None) -> list[HeldWebhook]:
    """The webhooks (or the one) leased to ``owner``, freshly read."""
    q = (
        select(Webhook, Tenant.slug)
        .join(Tenant, Tenant.id == Webhook.tenant_id)
        .where(Webhook.lease_owner == owner)
        .order_by(Webhook.id)
    )
    if webhook_id is not None:
        q = q.where(Webhook.id == webhook_id)
    return [_held(w, slug) for w, slug in s.execute(q).all()]


def _held(w: Webhook, slug: str) -> HeldWebhook:
    return HeldWebhook(
        id=w.id,
        tenant_id=w.tenant_id,
        tenant=slug,
        url=w.url,
        secret=w.secret,
        events=w.events,
        campaign_cursor=w.campaign_cursor,
        device_cursor=w.device_cursor,
        flushed_at=None if w.flushed_at is None else aware(w.flushed_at),
    )


def release(s: Session, owner: str) -> None:
    s.execute(update(Webhook).where(Webhook.lease_owner == owner).values(lease_owner=None, lease_until=None))


# -- the events past the cursors ---------------------------------------------------------------


def campaign_events_after(
    s: Session, tenant_id: int, after: int, upto: int, limit: int
) -> list[CampaignEventRow]:
    """Campaign events of the tenant with ``after < id <= upto``, oldest first."""
    q = (
        select(CampaignEvent, Campaign.name)
        .join(Campaign, Campaign.id == CampaignEvent.campaign_id)
        .where(CampaignEvent.tenant_id == tenant_id, CampaignEvent.id > after, CampaignEvent.id <= upto)
        .order_by(CampaignEvent.id)
        .limit(limit)
    )
    return [
        CampaignEventRow(
            id=e.id,
            campaign_id=e.campaign_id,
            campaign_name=name,
            at=aware(e.at),
            state=e.state,
            reason=e.reason,
            kind=e.kind,
        )
        for e, name in s.execute(q).all()
    ]


def failures_after(s: Session, tenant_id: int, after: int, upto: int, limit: int) -> list[FailureRow]:
    """Device history entries of the tenant in a failed state with ``after < id <= upto``, oldest
    first."""
    q = (
        select(DeviceEvent, Campaign.name.label("campaign_name"), Device.name.label("device"))
        .join(Campaign, Campaign.id == DeviceEvent.campaign_id)
        .join(Device, Device.id == DeviceEvent.device_id)
        .where(
            DeviceEvent.tenant_id == tenant_id,
            DeviceEvent.id > after,
            DeviceEvent.id <= upto,
            DeviceEvent.state.in_(sorted(FAILED_STATES)),
        )
        .order_by(DeviceEvent.id)
        .limit(limit)
    )
    return [
        FailureRow(
            id=r.DeviceEvent.id,
            campaign_id=r.DeviceEvent.campaign_id,
            campaign_name=r.campaign_name,
            device=r.device,
            at=aware(r.DeviceEvent.at),
            state=r.DeviceEvent.state,
            result=r.DeviceEvent.result,
            detail=r.DeviceEvent.detail,
        )
        for r in s.execute(q).all()
    ]


def newest_events(s: Session) -> tuple[int, int]:
    """The newest committed ids of campaign events and of device history. Ids are taken when a row
    is written, not when it commits: on PostgreSQL a smaller id may still become visible later,
    so the worker tails only up to ids it read a while ago (see ``fwcm.server.webhooks``)."""
    campaign = s.scalar(select(func.max(CampaignEvent.id))) or 0
    device = s.scalar(select(func.max(DeviceEvent.id))) or 0
    return campaign, device


def enqueue(
    s: Session,
    hook: HeldWebhook,
    owner: str,
    rows: Sequence[dict[str, Any]],
    campaign_cursor: int,
    device_cursor: int,
    *,
    flushed: bool,
) -> bool:
    """Add deliveries and move the cursors in one go, if ``owner`` still holds the lease (False:
    another replica took it, nothing written)."""
    values: dict[str, Any] = {"campaign_cursor": campaign_cursor, "device_cursor": device_cursor}
    if flushed:
        values["flushed_at"] = utcnow()
    moved = s.execute(
        update(Webhook)
        .where(
            Webhook.id == hook.id,
            Webhook.lease_owner == owner,
            Webhook.campaign_cursor == hook.campaign_cursor,
            Webhook.device_cursor == hook.device_cursor,
        )
        .values(**values)
    )
    if not moved.rowcount:  # type: ignore[attr-defined]
        return False
    if rows:
        now = utcnow()
        fresh = {"webhook_id": hook.id, "state": "pending", "attempts": 0, "next_at": now, "created_at": now}
        s.execute(
            insert(WebhookDelivery),
            [{**r, **fresh} for r in rows],
        )
        _bound_pending(s, hook.id)
    return True


def _bound_pending(s: Session, webhook_id: int) -> None:
    ids = list(
        s.scalars(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.webhook_id == webhook_id, WebhookDelivery.state == "pending")
            .order_by(WebhookDelivery.id.desc())
            .offset(MAX_PENDING)
        )
    )
    if ids:
        s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_(ids))
            .values(state="failed", last_error=f"dropped: more than {MAX_PENDING} deliveries waiting")
        )


# -- deliveries --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Due:
    id: int
    event_id: str
    type: str
    body: bytes
    attempts: int
    next_at: datetime


def head(s: Session, webhook_id: int) -> Due | None:
    """The oldest pending delivery of a webhook: deliveries go out one at a time, in order."""
    d = s.scalar(
        select(WebhookDelivery)
        .where(WebhookDelivery.webhook_id == webhook_id, WebhookDelivery.state == "pending")
        .order_by(WebhookDelivery.id)
        .limit(1)
    )
    if d is None:
        return None
    return Due(d.id, d.event_id, d.type, d.body, d.attempts, aware(d.next_at))


def record_attempt(
    s: Session,
    webhook_id: int,
    owner: str,
    delivery_id: int,
    state: str,
    status: int | None,
    error: str | None,
    next_at: datetime | None,
) -> None:
    """Log one attempt: delivered, failed for good, or pending again until ``next_at``; only
    while ``owner`` holds the webhook's lease."""
    mine = select(Webhook.id).where(Webhook.id == webhook_id, Webhook.lease_owner == owner)
    now = utcnow()
    values: dict[str, Any] = {
        "state": state,
        "attempts": WebhookDelivery.attempts + 1,
        "last_at": now,
        "last_status": status,
        "last_error": error,
    }
    if next_at is not None:
        values["next_at"] = next_at
    res = s.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.state == "pending",
            WebhookDelivery.webhook_id.in_(mine),
        )
        .values(**values)
        .returning(WebhookDelivery.attempts)
    ).first()
    if res is not None:
        tried = {"attempt": res.attempts, "at": now, "status": status, "error": error}
        s.add(WebhookAttempt(delivery_id=delivery_id, **tried))


def attempts_of(s: Session, delivery_ids: Sequence[int]) -> dict[int, list[WebhookAttempt]]:
    """The logged tries of these deliveries, in order."""
    out: dict[int, list[WebhookAttempt]] = {}
    rows = s.scalars(
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id.in_(list(delivery_ids)))
        .order_by(WebhookAttempt.delivery_id, WebhookAttempt.attempt)
    )
    for a in rows:
        out.setdefault(a.delivery_id, []).append(a)
    return out


def trim(s: Session, keep: int = KEEP_DONE) -> int:
    """Delete delivered and failed deliveries beyond the newest ``keep`` of each webhook."""
    done = WebhookDelivery.state != "pending"
    by_hook = WebhookDelivery.webhook_id
    newest = func.row_number().over(partition_by=by_hook, order_by=WebhookDelivery.id.desc())
    ranked = select(WebhookDelivery.id, newest.label("rn")).where(done).subquery()
    old = select(ranked.c.id).where(ranked.c.rn > keep)
    res = s.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(old)))
    return int(res.rowcount or 0)  # type: ignore[attr-defined]
