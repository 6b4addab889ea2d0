"""Dead letters: device messages that passed every check but failed to apply.

Ingest keeps each one (tenant, device, transport, the raw bytes, why) instead of retrying it, and
acknowledges it; the owning tenant reads them.  Bounded to the newest rows per tenant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from fwcm.store.db import utcnow
from fwcm.store.models import DeadLetter

PER_TENANT = 1000
"""Dead letters kept per tenant; older ones are trimmed (one tenant's flood evicts only its own)."""


@dataclass(frozen=True)
class Letter:
    tenant_id: int
    device: str
    transport: str
    payload: bytes
    reason: str
    error: str


def add(s: Session, letters: Sequence[Letter]) -> None:
    if not letters:
        return
    now = utcnow()
    s.execute(
        insert(DeadLetter),
        [
            {
                "tenant_id": x.tenant_id,
                "device": x.device,
                "transport": x.transport,
                "payload": x.payload,
                "reason": x.reason,
                "error": x.error,
                "at": now,
            }
            for x in letters
        ],
    )


def probe(s: Session) -> None:
    """A write statement that changes nothing: it fails when the database takes no writes
    (unreachable, locked, read-only), which is what tells an outage from a poisoned message."""
    s.execute(delete(DeadLetter).where(DeadLetter.id < 0))


def page(
    s: Session, tenant_id: int, limit: int, offset: int, device: str | None = None
) -> tuple[int, list[DeadLetter]]:
    """A tenant's dead letters, newest first, and how many there are."""
    where = [DeadLetter.tenant_id == tenant_id]
    if device is not None:
        where.append(DeadLetter.device == device)
    total = s.execute(select(func.count()).select_from(DeadLetter).where(*where)).scalar_one()
    newest_first = select(DeadLetter).where(*where).order_by(DeadLetter.id.desc())
    return int(total), list(s.scalars(newest_first.limit(limit).offset(offset)))


def trim(s: Session, keep: int = PER_TENANT) -> int:
    """Delete dead letters beyond the newest ``keep`` of each tenant."""
    newest = func.row_number().over(partition_by=DeadLetter.tenant_id, order_by=DeadLetter.id.desc())
    ranked = select(DeadLetter.id, newest.label("rn")).subquery()
    old = select(ranked.c.id).where(ranked.c.rn > keep)
    res = s.execute(delete(DeadLetter).where(DeadLetter.id.in_(old)))
    return int(res.rowcount or 0)  # type: ignore[attr-defined]
