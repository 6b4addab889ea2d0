"""Webhooks of the calling tenant: URLs the server posts signed JSON events to, and their
delivery logs (``/api/v1/webhooks``). The rules are in :mod:`fwcm.webhooks`, delivery in
:mod:`fwcm.server.webhooks`; docs/operations.md describes the events and how to verify them.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from fwcm import webhooks as rules
from fwcm.api import schemas as sc
from fwcm.api.deps import MANAGEMENT_ERRORS, Tenant, router
from fwcm.store import webhooks as wq
from fwcm.store.db import Database
from fwcm.store.models import Webhook, WebhookAttempt, WebhookDelivery


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=rules.MAX_URL, description="http or https URL the server will POST to.")
    events: list[Annotated[str, Field(max_length=40)]] | None = Field(
        None,
        max_length=len(rules.EVENT_TYPES),
        description=f"Event types to receive ({', '.join(rules.EVENT_TYPES)}); all when omitted.",
    )


class WebhookOut(BaseModel):
    id: int
    url: str
    events: list[str] | None = Field(description="Subscribed event types; null: all.")
    created_at: sc.Timestamp
    pending: int = Field(0, description="Deliveries waiting to be sent or retried.")

    @classmethod
    def of(cls, w: Webhook, pending: int = 0) -> WebhookOut:
        return cls(id=w.id, url=w.url, events=w.events, created_at=w.created_at, pending=pending)


class WebhookCreated(WebhookOut):
    secret: str = Field(description="HMAC-SHA256 key of the signatures. Shown only in this answer.")


class WebhookPage(sc.Page[WebhookOut]):
    pass


class AttemptOut(BaseModel):
    attempt: int
    at: sc.Timestamp
    status: int | None = Field(description="HTTP status the receiver answered (null: no answer).")
    error: str | None

    @classmethod
    def of(cls, a: WebhookAttempt) -> AttemptOut:
        return cls(attempt=a.attempt, at=a.at, status=a.status, error=a.error)


class DeliveryOut(BaseModel):
    id: int
    event_id: str
    type: str
    state: str = Field(description="pending, delivered or failed (given up)")
    attempts: int
    last_at: sc.Timestamp | None = Field(description="When the last attempt was made.")
    last_status: int | None = Field(description="HTTP status of the last attempt (null: no answer).")
    last_error: str | None
    next_at: sc.Timestamp | None = Field(description="Pending: when the next attempt is due.")
    created_at: sc.Timestamp
    tries: list[AttemptOut] = Field(description="Every attempt, oldest first.")

    @classmethod
    def of(cls, d: WebhookDelivery, tries: list[WebhookAttempt]) -> DeliveryOut:
        return cls(
            id=d.id,
            event_id=d.event_id,
            type=d.type,
            state=d.state,
            attempts=d.attempts,
            last_at=d.last_at,
            last_status=d.last_status,
            last_error=d.last_error,
            next_at=d.next_at if d.state == "pending" else None,
            created_at=d.created_at,
            tries=[AttemptOut.of(a) for a in tries],
        )


class DeliveryPage(sc.Page[DeliveryOut]):
    pass


def create_router(db: Database) -> APIRouter:
    api = router(*MANAGEMENT_ERRORS)

    @api.post("/webhooks", response_model=WebhookCreated, status_code=201, tags=["webhooks"])
    def add_webhook(body: WebhookIn, t: Tenant) -> WebhookCreated:
        """Register a URL for the tenant's events from now on. The server calls out to it: the
        answer carries the signing secret, once."""
        url = rules.check_url(body.url)
        events = rules.check_events(body.events)
        with db.session() as s:
            hook = wq.create(s, t.id, url, events, secrets.token_hex(32), rules.PER_TENANT)
            return WebhookCreated(**WebhookOut.of(hook).model_dump(), secret=hook.secret)

    @api.get("/webhooks", response_model=WebhookPage, tags=["webhooks"])
    def list_webhooks(t: Tenant, limit: sc.Limit = 100, offset: sc.Offset = 0) -> WebhookPage:
        """The tenant's webhooks, oldest first, each with how many deliveries wait."""
        with db.read() as s:
            total, hooks = wq.list_webhooks(s, t.id, limit, offset)
            pending = wq.pending_counts(s, [h.id for h in hooks])
            items = [WebhookOut.of(h, pending.get(h.id, 0)) for h in hooks]
        return WebhookPage.of(total, limit, offset, items)

    @api.get("/webhooks/{webhook_id}", response_model=WebhookOut, tags=["webhooks"])
    def get_webhook(webhook_id: sc.RowId, t: Tenant) -> WebhookOut:
        with db.read() as s:
            hook = wq.get(s, t.id, webhook_id)
            return WebhookOut.of(hook, wq.pending_counts(s, [hook.id]).get(hook.id, 0))

    @api.delete("/webhooks/{webhook_id}", status_code=204, tags=["webhooks"])
    def remove_webhook(webhook_id: sc.RowId, t: Tenant) -> Response:
        """Stop sending to this URL; its waiting deliveries and its log are deleted."""
        with db.session() as s:
            wq.remove(s, t.id, webhook_id)
        return Response(status_code=204)

    @api.get("/webhooks/{webhook_id}/deliveries", response_model=DeliveryPage, tags=["webhooks"])
    def webhook_deliveries(
        webhook_id: sc.RowId, t: Tenant, limit: sc.Limit = 50, offset: sc.Offset = 0
    ) -> DeliveryPage:
        """The delivery log, newest first: every delivery's state and each of its attempts
        (time, status, error). The newest 200 finished deliveries of a webhook are kept."""
        with db.read() as s:
            total, rows = wq.deliveries(s, t.id, webhook_id, limit, offset)
            tries = wq.attempts_of(s, [d.id for d in rows])
            items = [DeliveryOut.of(d, tries.get(d.id, [])) for d in rows]
        return DeliveryPage.of(total, limit, offset, items)

    return api
