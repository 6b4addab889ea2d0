"""Keys the server holds for a tenant (its CA, its signers), releases asking a held signer for a
signature, and their approvals.  SQL only: the rules are ``fwcm.signing``'s, the key store and the
signature are ``fwcm.server.signing``'s."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fwcm.errors import NotFound
from fwcm.store.models import Release, ReleaseApproval, SigningKey, utcnow
from fwcm.store.paging import page

SIGNER = "signer"


def find_key(s: Session, tenant_id: int, purpose: str, name: str) -> SigningKey | None:
    """The tenant's held key for ``purpose`` (``ca`` or ``signer``) named ``name``, if any."""
    return s.scalar(
        select(SigningKey).where(
            SigningKey.tenant_id == tenant_id, SigningKey.purpose == purpose, SigningKey.name == name
        )
    )


def add_key(s: Session, **fields: Any) -> SigningKey:
    row = SigningKey(**fields)
    s.add(row)
    s.flush()
    return row


def key_of(s: Session, release: Release) -> SigningKey:
    row = s.get(SigningKey, release.signing_key_id)
    if row is None:  # the foreign key keeps it; a missing row is a broken database
        raise NotFound(f"the key of release {release.id} is gone")
    return row


def release_key(s: Session, tenant_id: int, manifest_id: int) -> SigningKey | None:
    """The held key whose signed release is this manifest, if the server signed it."""
    return s.scalar(
        select(SigningKey)
        .join(Release, Release.signing_key_id == SigningKey.id)
        .where(Release.tenant_id == tenant_id, Release.manifest_id == manifest_id, Release.state == "signed")
        .limit(1)
    )


def held_signers(s: Session, tenant_id: int, limit: int, offset: int) -> tuple[int, Sequence[SigningKey]]:
    q = select(SigningKey).where(SigningKey.tenant_id == tenant_id, SigningKey.purpose == SIGNER)
    return page(s, q.order_by(SigningKey.id), limit, offset)


def add_release(s: Session, **fields: Any) -> Release:
    release = Release(**fields)
    s.add(release)
    s.flush()
    return release


def get_release(s: Session, tenant_id: int, release_id: int, *, lock: bool = False) -> Release:
    """One release of the tenant (``lock``: held until the transaction ends); 404 otherwise."""
    q = select(Release).where(Release.tenant_id == tenant_id, Release.id == release_id)
    release = s.scalar(q.with_for_update() if lock else q)
    if release is None:
        raise NotFound(f"release {release_id} not found")
    return release


def list_releases(
    s: Session, tenant_id: int, limit: int, offset: int, state: str | None = None
) -> tuple[int, Sequence[Release]]:
    q = select(Release).where(Release.tenant_id == tenant_id)
    if state:
        q = q.where(Release.state == state)
    return page(s, q.order_by(Release.id), limit, offset)


def approvals(s: Session, release_id: int) -> list[ReleaseApproval]:
    q = select(ReleaseApproval).where(ReleaseApproval.release_id == release_id)
    return list(s.scalars(q.order_by(ReleaseApproval.id)))


def add_approval(s: Session, release_id: int, key_name: str, role: str) -> None:
    s.add(ReleaseApproval(release_id=release_id, key_name=key_name, role=role, at=utcnow()))
    s.flush()
