"""Tenants and their API keys.

A tenant is a fleet owner (devices, campaigns) or a manufacturer (factory devices).  API keys are
stored as SHA-256: they are random, so a slow hash adds nothing, and the plaintext is returned
once, when the key is made.  A tenant has several named keys, each with a role (``fwcm.roles``)
and an optional expiry; a revoked key stays (marked) so a refusal can say why.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from fwcm.errors import Conflict, NotFound
from fwcm.names import check_name
from fwcm.store.db import aware, utcnow
from fwcm.store.models import ApiKey, Tenant
from fwcm.store.paging import page

log = logging.getLogger(__name__)

API_KEY_PREFIX = "fwcm_"
INITIAL_KEY = "initial"
"""The name of the admin key a tenant is created with."""
MAX_ACTIVE_KEYS = 50
"""Keys not revoked per tenant: rotation needs two at a time, automation a few more."""
REVOKED_KEPT = 100
"""Revoked keys kept per tenant (newest first), so a refusal can say "revoked"; older ones go."""
TOUCH_EVERY = timedelta(minutes=1)
"""``last_used_at`` is written at most this often per key, so reads do not all take the write lock."""


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(s: Session, slug: str, name: str | None = None, kind: str = "fleet") -> tuple[Tenant, str]:
    """Create a tenant and its first API key; the plaintext key is returned only here."""
    check_name(slug, "tenant slug")
    if kind not in ("fleet", "manufacturer"):
        raise ValueError(f"tenant kind must be fleet or manufacturer, not {kind!r}")
    if s.scalar(select(Tenant.id).where(Tenant.slug == slug)) is not None:
        raise Conflict(f"tenant {slug!r} already exists")
    tenant = Tenant(slug=slug, name=name or slug, kind=kind)
    s.add(tenant)
    s.flush()
    key = add_api_key(s, tenant.id, INITIAL_KEY)
    log.info("created tenant %s (id %d)", slug, tenant.id)
    return tenant, key


def add_api_key(
    s: Session,
    tenant_id: int,
    name: str = INITIAL_KEY,
    role: str = "admin",
    expires_at: datetime | None = None,
) -> str:
    """Make a key; the plaintext is returned only here."""
    return create_key(s, tenant_id, name, role, expires_at)[1]


def create_key(
    s: Session, tenant_id: int, name: str, role: str, expires_at: datetime | None = None
) -> tuple[ApiKey, str]:
    """A new key of the tenant and its plaintext (409 if a key not revoked has that name, or the
    tenant holds ``MAX_ACTIVE_KEYS``)."""
    check_name(name, "key name")
    active = s.scalars(select(ApiKey.name).where(ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None)))
    names = set(active)
    if name in names:
        raise Conflict(f"a key named {name!r} exists; revoke it first or choose another name")
    if len(names) >= MAX_ACTIVE_KEYS:
        raise Conflict(f"the tenant holds {len(names)} keys, the most allowed; revoke one first")
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(tenant_id=tenant_id, key_hash=_hash_key(key), name=name, role=role, expires_at=expires_at)
    s.add(row)
    s.flush()
    return row, key


def list_keys(
    s: Session, tenant_id: int, limit: int, offset: int, include_revoked: bool = False
) -> tuple[int, Sequence[ApiKey]]:
    """A page of the tenant's keys, oldest first, and how many there are."""
    q = select(ApiKey).where(ApiKey.tenant_id == tenant_id)
    if not include_revoked:
        q = q.where(ApiKey.revoked_at.is_(None))
    return page(s, q.order_by(ApiKey.id), limit, offset)


def revoke_key(s: Session, tenant_id: int, name: str) -> ApiKey:
    """Revoke the tenant's key ``name`` (404 if none); the last admin key cannot be revoked (409),
    or nobody could manage the tenant's keys any more."""
    row = s.scalar(
        select(ApiKey)
        .where(ApiKey.tenant_id == tenant_id, ApiKey.name == name, ApiKey.revoked_at.is_(None))
        .with_for_update()
    )
    if row is None:
        raise NotFound(f"no key named {name!r}")
    now = utcnow()
    if row.role == "admin":
        admins = s.scalar(
            select(func.count())
            .select_from(ApiKey)
            .where(
                ApiKey.tenant_id == tenant_id,
                ApiKey.role == "admin",
                ApiKey.revoked_at.is_(None),
                or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now),
            )
        )
        if (admins or 0) <= 1:
            raise Conflict(f"{name!r} is the tenant's last admin key; create another admin key first")
    row.revoked_at = now
    s.flush()
    return row


def trim_revoked(s: Session, keep: int = REVOKED_KEPT) -> int:
    """Delete revoked keys beyond the newest ``keep`` of each tenant (a key deleted here is refused
    as unknown)."""
    newest = func.row_number().over(
        partition_by=ApiKey.tenant_id, order_by=(ApiKey.revoked_at.desc(), ApiKey.id.desc())
    )
    ranked = select(ApiKey.id, newest.label("rn")).where(ApiKey.revoked_at.is_not(None)).subquery()
    res = s.execute(delete(ApiKey).where(ApiKey.id.in_(select(ranked.c.id).where(ranked.c.rn > keep))))
    return int(res.rowcount or 0)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class KeyCheck:
    """What a presented key resolves to: ``refused`` is None for a usable key, else ``expired`` or
    ``revoked``.  An unknown key resolves to nothing at all."""

    tenant: Tenant
    key: ApiKey
    refused: str | None


def check_key(s: Session, key: str, now: datetime | None = None) -> KeyCheck | None:
    """Resolve a presented key, usable or not; None when no tenant has it."""
    if not key.startswith(API_KEY_PREFIX) or len(key) > 200:
        return None
    row = s.execute(
        select(ApiKey, Tenant)
        .join(Tenant, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == _hash_key(key))
    ).first()
    if row is None:
        return None
    api_key, tenant = row.ApiKey, row.Tenant
    now = now or utcnow()
    refused = None
    if api_key.revoked_at is not None:
        refused = "revoked"
    elif api_key.expires_at is not None and aware(api_key.expires_at) <= now:
        refused = "expired"
    return KeyCheck(tenant, api_key, refused)


def needs_touch(k: ApiKey, now: datetime) -> bool:
    """Whether the key's last use is stale enough to be written again."""
    return k.last_used_at is None or now - aware(k.last_used_at) >= TOUCH_EVERY


def touch_key(s: Session, key_id: int, now: datetime) -> None:
    """Record a use of the key, unless another request did within ``TOUCH_EVERY``."""
    s.execute(
        update(ApiKey)
        .where(
            ApiKey.id == key_id,
            or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= now - TOUCH_EVERY),
        )
        .values(last_used_at=now)
    )


def tenant_for_key(s: Session, key: str) -> Tenant | None:
    """The tenant of a usable key (neither revoked nor expired)."""
    found = check_key(s, key)
    return found.tenant if found is not None and found.refused is None else None


def get_tenant(s: Session, tenant_id: int) -> Tenant:
    tenant = s.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"tenant {tenant_id} not found")
    return tenant


def tenant_by_slug(s: Session, slug: str) -> Tenant | None:
    return s.scalar(select(Tenant).where(Tenant.slug == slug))
