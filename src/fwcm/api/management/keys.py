"""The tenant's API keys (``/api/v1/keys``, admin role): create, list, revoke.

Rotation without downtime: create a new key, switch the clients to it, revoke the old one.  The
plaintext of a key is in the answer to its creation only; the server keeps its hash.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field

from fwcm import roles
from fwcm.api import schemas as sc
from fwcm.api.deps import MANAGEMENT_ERRORS, AnyTenant, ApiError, router
from fwcm.store import tenants
from fwcm.store.db import Database, utcnow
from fwcm.store.models import ApiKey


class KeyIn(BaseModel):
    name: str = Field(min_length=1, max_length=64, description="Unique among the tenant's keys not revoked")
    role: str = Field(
        description="viewer (read-only), operator (runs the fleet) or admin (also keys, signers)"
    )
    expires_at: datetime | None = Field(
        None, description="When the key stops working (RFC 3339); none: never"
    )


class KeyOut(BaseModel):
    name: str
    role: str
    created_at: sc.Timestamp | None
    expires_at: sc.Timestamp | None
    last_used_at: sc.Timestamp | None = Field(description="Updated at most once a minute")
    revoked_at: sc.Timestamp | None

    @classmethod
    def of(cls, k: ApiKey) -> KeyOut:
        return cls(
            name=k.name,
            role=k.role,
            created_at=k.created_at,
            expires_at=k.expires_at,
            last_used_at=k.last_used_at,
            revoked_at=k.revoked_at,
        )


class NewKeyOut(KeyOut):
    key: str = Field(description="The key itself: shown only here, store it now")


class KeyPage(sc.Page[KeyOut]):
    pass


def create_router(db: Database) -> APIRouter:
    api = router(*MANAGEMENT_ERRORS, 403)

    @api.post("/keys", response_model=NewKeyOut, status_code=201, tags=["keys"])
    def create_key(body: KeyIn, t: AnyTenant) -> NewKeyOut:
        """Create a key with a role and an optional expiry; its plaintext is returned this once."""
        try:
            role = roles.Role.parse(body.role)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        expires = body.expires_at
        if expires is not None:
            expires = expires.astimezone(UTC) if expires.tzinfo else expires.replace(tzinfo=UTC)
            if expires <= utcnow():
                raise ApiError(422, f"expires_at {expires.isoformat()} is in the past")
        with db.session() as s:
            row, secret = tenants.create_key(s, t.id, body.name, role.label, expires)
            return NewKeyOut(**KeyOut.of(row).model_dump(), key=secret)

    @api.get("/keys", response_model=KeyPage, tags=["keys"])
    def list_keys(
        t: AnyTenant,
        revoked: Annotated[bool, Query(description="Include revoked keys")] = False,
        limit: sc.Limit = 100,
        offset: sc.Offset = 0,
    ) -> KeyPage:
        """The tenant's keys (never their secrets), oldest first."""
        with db.read() as s:
            total, rows = tenants.list_keys(s, t.id, limit, offset, include_revoked=revoked)
            return KeyPage.of(total, limit, offset, [KeyOut.of(k) for k in rows])

    @api.delete("/keys/{name}", response_model=KeyOut, tags=["keys"])
    def revoke_key(name: Annotated[str, Path(max_length=64)], t: AnyTenant) -> KeyOut:
        """Revoke a key: it is refused from now on.  The last admin key cannot be revoked."""
        with db.session() as s:
            return KeyOut.of(tenants.revoke_key(s, t.id, name))

    return api
