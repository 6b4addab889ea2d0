"""Server-made patches of a tenant, as stored: which source images a campaign's devices run, the
patch cached per (target manifest, base image) or why there is none, which deployment uses one,
and the bytes a campaign sends with them. SQL only: the rules are ``fwcm.delta``'s and the work is
``fwcm.server.deltas``'."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import NamedTuple

from sqlalchemy import ColumnElement, case, func, select, update
from sqlalchemy.orm import Session

from fwcm.store.models import Campaign, Delta, Deployment, Device, Manifest, Payload

READY = "ready"
SKIPPED = "skipped"


def running_images(s: Session, targets: ColumnElement[bool]) -> dict[str, int]:
    """Image digest → how many of the selected devices say they run it (unknown ones left out)."""
    rows = s.execute(
        select(Device.image_digest, func.count().label("n"))
        .where(targets, Device.image_digest.is_not(None))
        .group_by(Device.image_digest)
    )
    return {r.image_digest: r.n for r in rows}


def held_images(s: Session, tenant_id: int, digests: Collection[str]) -> set[str]:
    """Which of these images the tenant has uploaded (the bases the server can diff from)."""
    if not digests:
        return set()
    found = s.scalars(
        select(Payload.sha256).where(Payload.tenant_id == tenant_id, Payload.sha256.in_(list(digests)))
    )
    return set(found)


class Made(NamedTuple):
    """A patch kept for one base image, or why there is none (``state`` skipped)."""

    id: int
    base_digest: str
    state: str
    reason: str | None
    patch_size: int | None
    delta_manifest_id: int | None


def _made(d: Delta) -> Made:
    return Made(d.id, d.base_digest, d.state, d.reason, d.patch_size, d.delta_manifest_id)


def cached(s: Session, tenant_id: int, manifest_id: int) -> dict[str, Made]:
    """The patches (or refusals) made before for this manifest, by base image."""
    rows = s.scalars(select(Delta).where(Delta.tenant_id == tenant_id, Delta.manifest_id == manifest_id))
    return {d.base_digest: _made(d) for d in rows}


def patch_digests(s: Session) -> set[str]:
    """Every server-made patch's digest (payloads counted as delta bytes when served)."""
    return set(s.scalars(select(Delta.patch_digest).where(Delta.patch_digest.is_not(None))))


def has_deltas(s: Session, tenant_id: int, manifest_id: int) -> bool:
    """Whether patches were made for this manifest (its campaigns then count bytes)."""
    found = select(Delta.id).where(Delta.tenant_id == tenant_id, Delta.manifest_id == manifest_id).limit(1)
    return s.scalar(found) is not None


def record(s: Session, **fields: object) -> Made:
    """Keep what was made for one base image (a concurrent start may have kept it first)."""
    found = s.scalar(
        select(Delta).where(
            Delta.tenant_id == fields["tenant_id"],
            Delta.manifest_id == fields["manifest_id"],
            Delta.base_digest == fields["base_digest"],
        )
    )
    if found is not None:
        return _made(found)
    row = Delta(**fields)
    s.add(row)
    s.flush()
    return _made(row)


def assign(s: Session, campaign_id: int, tenant_id: int, given: Iterable[tuple[int, str]]) -> int:
    """Give each deployment of a starting campaign whose device runs one of these bases (delta id,
    base digest) that patch's delta manifest; returns how many deployments got one."""
    count = 0
    for delta_id, base in given:
        d = s.get(Delta, delta_id)
        if d is None or d.tenant_id != tenant_id or d.delta_manifest_id is None:
            continue
        on_base = select(Device.id).where(Device.tenant_id == tenant_id, Device.image_digest == base)
        done = s.execute(
            update(Deployment)
            .where(Deployment.campaign_id == campaign_id, Deployment.device_id.in_(on_base))
            .values(manifest_id=d.delta_manifest_id, delta_id=d.id)
            .returning(Deployment.device_id)
            .execution_options(synchronize_session=False)
        )
        count += len(done.all())
    return count


FETCHED = ("downloaded", "installing", "succeeded", "reverted")
"""States after which a device has fetched everything its update needs."""


def bytes_sent(s: Session, campaign_id: int) -> dict[str, int]:
    """What a campaign's devices that fetched their update fetched: the patch of those on one, the
    image of the others, and what all of them would have fetched without patches."""
    image_size = (
        select(Manifest.image_size)
        .where(Manifest.id == func.coalesce(Deployment.manifest_id, _campaign_manifest(campaign_id)))
        .scalar_subquery()
    )
    patch = select(Delta.patch_size).where(Delta.id == Deployment.delta_id).scalar_subquery()
    on_delta = Deployment.delta_id.is_not(None)
    row = s.execute(
        select(
            func.coalesce(func.sum(case((on_delta, patch), else_=0)), 0).label("delta"),
            func.coalesce(func.sum(case((on_delta, 0), else_=image_size)), 0).label("full"),
            func.coalesce(func.sum(image_size), 0).label("without"),
            func.count().filter(on_delta).label("on_delta"),
        ).where(Deployment.campaign_id == campaign_id, Deployment.state.in_(FETCHED))
    ).one()
    return {
        "delta": int(row.delta),
        "full": int(row.full),
        "without_deltas": int(row.without),
        "devices_on_delta": int(row.on_delta),
    }


def _campaign_manifest(campaign_id: int) -> ColumnElement[int]:
    return select(Campaign.manifest_id).where(Campaign.id == campaign_id).scalar_subquery()
