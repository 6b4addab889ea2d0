"""The audit log: every mutating API request made with a valid key, kept per tenant.

Bounded by count per tenant and by age, trimmed by the server's housekeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from fwcm.store.db import utcnow
from fwcm.store.models import AuditEntry
from fwcm.store.paging import page

PER_TENANT = 10_000
"""Entries kept per tenant; older ones are trimmed (one tenant's burst evicts only its own)."""
MAX_AGE = timedelta(days=90)
"""Entries older than this are trimmed whatever their number."""


@dataclass(frozen=True)
class Entry:
    tenant_id: int
    key_name: str
    role: str
    method: str
    route: str
    status: int
    source: str
    object: dict[str, Any] = field(default_factory=dict)


def record(s: Session, e: Entry, at: datetime | None = None) -> None:
    s.execute(
        insert(AuditEntry).values(
            tenant_id=e.tenant_id,
            at=at or utcnow(),
            key_name=e.key_name[:64],
            role=e.role[:8],
            method=e.method[:8],
            route=e.route[:200],
            object=e.object,
            status=e.status,
            source=e.source[:64],
        )
    )


def list_entries(
    s: Session, tenant_id: int, limit: int, offset: int, since: datetime | None = None
) -> tuple[int, Sequence[AuditEntry]]:
    """A page of the tenant's entries at or after ``since``, newest first, and how many there are."""
    q = select(AuditEntry).where(AuditEntry.tenant_id == tenant_id)
    if since is not None:
        q = q.where(AuditEntry.at >= since)
    return page(s, q.order_by(AuditEntry.id.desc()), limit, offset)


def trim(s: Session, keep: int = PER_TENANT, max_age: timedelta = MAX_AGE) -> int:
    """Delete entries older than ``max_age`` and beyond the newest ``keep`` of each tenant."""
    old = s.execute(delete(AuditEntry).where(AuditEntry.at < utcnow() - max_age))
    newest = func.row_number().over(partition_by=AuditEntry.tenant_id, order_by=AuditEntry.id.desc())
    ranked = select(AuditEntry.id, newest.label("rn")).subquery()
    extra = s.execute(
        delete(AuditEntry).where(AuditEntry.id.in_(select(ranked.c.id).where(ranked.c.rn > keep)))
    )
    return int(old.rowcount or 0) + int(extra.rowcount or 0)  # type: ignore[attr-defined]
