"""Tenants and their API keys.

A tenant is a fleet owner (devices, campaigns) or a manufacturer (factory devices).  API keys are
stored as SHA-256: they are random, so a slow hash adds nothing, and the plaintext is returned
once, when the key is made.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from fwcm.errors import Conflict
from fwcm.names import check_name
from fwcm.store.models import ApiKey, Tenant

log = logging.getLogger(__name__)

API_KEY_PREFIX = "fwcm_"


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
    key = add_api_key(s, tenant.id)
    log.info("created tenant %s (id %d)", slug, tenant.id)
    return tenant, key


def add_api_key(s: Session, tenant_id: int, label: str = "default") -> str:
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    s.add(ApiKey(tenant_id=tenant_id, key_hash=_hash_key(key), label=label))
    s.flush()
    return key


def tenant_for_key(s: Session, key: str) -> Tenant | None:
    if not key.startswith(API_KEY_PREFIX):
        return None
    return s.scalar(
        select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id).where(ApiKey.key_hash == _hash_key(key))
    )


def tenant_by_slug(s: Session, slug: str) -> Tenant | None:
    return s.scalar(select(Tenant).where(Tenant.slug == slug))
