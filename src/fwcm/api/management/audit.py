"""The tenant's audit log (``GET /api/v1/audit``): who made which mutating request, newest first.

Written by ``fwcm.api.audit_trail``; a tenant sees only its own entries.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from fwcm.api import schemas as sc
from fwcm.api.deps import AnyTenant, router
from fwcm.store import audit
from fwcm.store.db import Database
from fwcm.store.models import AuditEntry


class AuditOut(BaseModel):
    at: sc.Timestamp
    key: str = Field(description="Name of the API key that made the request")
    role: str
    action: str = Field(
        description="Method and route template, e.g. POST /api/v1/campaigns/{campaign_id}/start"
    )
    object: dict[str, Any] = Field(description="The route's path parameters")
    status: int = Field(description="HTTP status of the answer (403: refused by role)")
    source: str = Field(description="Client address")

    @classmethod
    def of(cls, e: AuditEntry) -> AuditOut:
        return cls(
            at=e.at,
            key=e.key_name,
            role=e.role,
            action=f"{e.method} {e.route}",
            object=e.object or {},
            status=e.status,
            source=e.source,
        )


class AuditPage(sc.Page[AuditOut]):
    pass


def create_router(db: Database) -> APIRouter:
    api = router(401, 403, 422)

    @api.get("/audit", response_model=AuditPage, tags=["audit"])
    def audit_log(
        t: AnyTenant,
        since: Annotated[datetime | None, Query(description="Only entries at or after (RFC 3339)")] = None,
        limit: sc.Limit = 100,
        offset: sc.Offset = 0,
    ) -> AuditPage:
        """Mutating requests of the tenant's keys, newest first (kept 90 days, 10,000 at most)."""
        if since is not None:
            since = since.astimezone(UTC) if since.tzinfo else since.replace(tzinfo=UTC)
        with db.read() as s:
            total, rows = audit.list_entries(s, t.id, limit, offset, since)
            return AuditPage.of(total, limit, offset, [AuditOut.of(e) for e in rows])

    return api
