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

from fwcm import audit_chain
from fwcm.store.db import utcnow
from fwcm.store.models import AuditEntry, Tenant
from fwcm.store.paging import page

PER_TENANT = 10_000
"""Entries kept per tenant; older ones are trimmed (one tenant's burst evicts only its own)."""
MAX_AGE = timedelta(days=90)
"""Entries older than this are trimmed whatever their number."""
EVENT = "EVENT"
"""``method`` of an entry the signing service records itself (its ``route`` names the event)."""


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
    """Append an entry to the tenant's chain: the tenant row is locked (PostgreSQL; SQLite writers
    are serialised already) so two appends never both follow the same entry."""
    s.execute(select(Tenant.id).where(Tenant.id == e.tenant_id).with_for_update())
    prev = s.scalar(
        select(AuditEntry.hash)
        .where(AuditEntry.tenant_id == e.tenant_id, AuditEntry.hash.is_not(None))
        .order_by(AuditEntry.id.desc())
        .limit(1)
    )
    values: dict[str, Any] = {
        "tenant_id": e.tenant_id,
        "at": at or utcnow(),
        "key_name": e.key_name[:64],
        "role": e.role[:8],
        "method": e.method[:8],
        "route": e.route[:200],
        "object": e.object,
        "status": e.status,
        "source": e.source[:64],
    }
    prev_hash = prev or audit_chain.GENESIS
    s.execute(
        insert(AuditEntry).values(
            **values, prev_hash=prev_hash, hash=audit_chain.entry_hash(prev_hash, values)
        )
    )


def event(s: Session, tenant_id: int, key_name: str, role: str, what: str, **details: Any) -> None:
    """Record what the signing service did (``key.generated``, ``signature.made``, ...) in the
    same transaction as the change itself; ``details`` name the object and its digest."""
    obj = {str(k)[:64]: str(v)[:200] for k, v in details.items() if v is not None}
    record(s, Entry(tenant_id, key_name, role, EVENT, what, 200, "server", obj))


def chain(s: Session, tenant_id: int) -> list[dict[str, Any]]:
    """Every entry of the tenant, oldest first, as ``fwcm.audit_chain.verify`` reads them."""
    rows = s.scalars(select(AuditEntry).where(AuditEntry.tenant_id == tenant_id).order_by(AuditEntry.id))
    return [
        {
            "id": r.id,
            "tenant_id": r.tenant_id,
            "at": r.at,
            "key_name": r.key_name,
            "role": r.role,
            "method": r.method,
            "route": r.route,
            "object": r.object,
            "status": r.status,
            "source": r.source,
            "prev_hash": r.prev_hash,
            "hash": r.hash,
        }
        for r in rows
    ]


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
