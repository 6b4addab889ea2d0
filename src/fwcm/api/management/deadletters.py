"""Dead letters of the calling tenant: its devices' messages that passed every check but failed to
apply, set aside by ingest instead of blocking it (``GET /api/v1/dead-letters``).

Included by ``create_app``; a tenant sees only its own.
"""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from fwcm.api.deps import Tenant, router
from fwcm.api.schemas import Page, Timestamp
from fwcm.store import deadletters as dl
from fwcm.store.db import Database
from fwcm.store.models import DeadLetter


class DeadLetterOut(BaseModel):
    id: int
    device: str
    transport: str
    reason: str = Field(description="integrity, data, database or internal")
    error: str = Field(description="The database's (or the server's) one-line explanation.")
    at: Timestamp
    payload: str = Field(description="The message exactly as it arrived, base64.")

    @classmethod
    def of(cls, d: DeadLetter) -> DeadLetterOut:
        return cls(
            id=d.id,
            device=d.device,
            transport=d.transport,
            reason=d.reason,
            error=d.error,
            at=d.at,
            payload=base64.b64encode(d.payload).decode(),
        )


class DeadLetterPage(Page[DeadLetterOut]):
    pass


def create_router(db: Database) -> APIRouter:
    api = router(401, 403, 422)

    @api.get("/dead-letters", response_model=DeadLetterPage, tags=["devices"])
    def dead_letters(
        t: Tenant,
        device: Annotated[str | None, Query(max_length=64, description="Only this device's")] = None,
        limit: Annotated[int, Query(ge=1, le=dl.PER_TENANT)] = 100,
        offset: Annotated[int, Query(ge=0, le=dl.PER_TENANT)] = 0,
    ) -> DeadLetterPage:
        """The tenant's dead letters, newest first (at most the newest 1000 are kept)."""
        with db.read() as s:
            total, rows = dl.page(s, t.id, limit, offset, device)
            return DeadLetterPage.of(total, limit, offset, [DeadLetterOut.of(d) for d in rows])

    return api
