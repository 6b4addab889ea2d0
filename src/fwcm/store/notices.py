"""What notices are made of, as stored: the deployment a device's notice speaks for, credentials
due, the server's signing keys, revoked signers and protected images."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from sqlalchemy import (
    Row,
    and_,
    func,
    or_,
    select,
    tuple_,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from fwcm.attestation import Grant
from fwcm.manifest import generate_private_key, private_key_pem
from fwcm.rollout.states import DEVICE_TERMINAL, CampaignState, DeviceState
from fwcm.store.db import utcnow
from fwcm.store.deployments import Target
from fwcm.store.leases import ACTIVE
from fwcm.store.models import (
    Campaign,
    Deployment,
    Device,
    Manifest,
    ServerKey,
    Signer,
    Tenant,
)


class Speaking(NamedTuple):
    """A device's newest deployment that still has something to say to it, and what decides the
    notice (``rollout.deployment.notice_kind``)."""

    campaign: int
    target: Target
    manifest_id: int
    state: DeviceState
    campaign_state: CampaignState
    group_decision: str | None
    detail: str | None


def speaking_deployment(s: Session, tenant: str, device: str) -> Speaking | None:
    """The newest deployment of a device in progress in a live or cancelled campaign, or withdrawn
    (cancel, quorum not met, group abort) after it was notified: the device may have started, so
    it must see the withdrawal."""
    in_flight = [st.value for st in DEVICE_TERMINAL] + [DeviceState.PENDING.value]
    withdrawn = and_(Deployment.state == DeviceState.CANCELLED.value, Deployment.attempt > 0)
    live = [CampaignState.RUNNING.value, CampaignState.PAUSED.value, CampaignState.CANCELLED.value]
    ended = [CampaignState.CANCELLED.value, CampaignState.STOPPED.value]
    row = _newest_deployment(
        s,
        tenant,
        device,
        (
            Deployment.campaign_id,
            Deployment.device_id,
            Deployment.attempt,
            Device.transport,
            Device.secret,
            func.coalesce(Deployment.manifest_id, Campaign.manifest_id).label("manifest_id"),
            Campaign.state.label("campaign_state"),
            Deployment.nonce,
            Deployment.attested_at,
            Deployment.state,
            Campaign.group_decision,
            Deployment.detail,
        ),
        or_(
            and_(Deployment.state.notin_(in_flight), Campaign.state.in_(live)),
            and_(withdrawn, or_(Campaign.state.in_(ended), Campaign.group_decision == "abort")),
        ),
    )
    if row is None:
        return None
    target = Target(
        row.device_id,
        tenant,
        device,
        row.transport,
        row.secret,
        row.attempt,
        row.nonce,
        row.attested_at is not None,
    )
    return Speaking(
        row.campaign_id,
        target,
        row.manifest_id,
        DeviceState(row.state),
        CampaignState(row.campaign_state),
        row.group_decision,
        row.detail,
    )


def credential_targets(s: Session, pairs: Iterable[tuple[int, int]]) -> list[tuple[int, Target, int]]:
    """Succeeded deployments of attested campaigns among (campaign, device) ``pairs``."""
    wanted = list(set(pairs))
    if not wanted:
        return []
    rows = s.execute(
        select(
            Deployment.campaign_id,
            Deployment.device_id,
            Deployment.attempt,
            Tenant.slug,
            Device.name,
            Device.transport,
            Device.secret,
            Campaign.manifest_id,
        )
        .join(Device, Device.id == Deployment.device_id)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .join(Campaign, Campaign.id == Deployment.campaign_id)
        .where(
            tuple_(Deployment.campaign_id, Deployment.device_id).in_(wanted),
            Campaign.attestation.is_(True),
            Deployment.state == DeviceState.SUCCEEDED.value,
        )
    ).all()
    return [
        (r.campaign_id, Target(r.device_id, r.slug, r.name, r.transport, r.secret, r.attempt), r.manifest_id)
        for r in rows
    ]


def last_attested_success(s: Session, tenant: str, device: str) -> tuple[int, Target, int] | None:
    """The device's newest succeeded deployment of an attested campaign: its credential is due."""
    row = _newest_deployment(
        s,
        tenant,
        device,
        (
            Deployment.campaign_id,
            Deployment.device_id,
            Deployment.attempt,
            Device.transport,
            Device.secret,
            Campaign.manifest_id,
        ),
        Campaign.attestation.is_(True),
        Deployment.state == DeviceState.SUCCEEDED.value,
    )
    if row is None:
        return None
    target = Target(row.device_id, tenant, device, row.transport, row.secret, row.attempt)
    return row.campaign_id, target, row.manifest_id


def _newest_deployment(
    s: Session, tenant: str, device: str, columns: Sequence[Any], *where: ColumnElement[bool]
) -> Row[Any] | None:
    """The newest deployment of one device (by tenant slug and name) matching ``where``."""
    return s.execute(
        select(*columns)
        .join(Device, Device.id == Deployment.device_id)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .join(Campaign, Campaign.id == Deployment.campaign_id)
        .where(Tenant.slug == tenant, Device.name == device, *where)
        .order_by(Deployment.campaign_id.desc())
        .limit(1)
    ).first()


def grant_for(s: Session, campaign_id: int, device_pk: int, *, ttl_s: int) -> Grant | None:
    """What a token or credential for this deployment says (tenant, device, manifest and image)."""
    row = s.execute(
        select(Tenant.slug, Device.name, Manifest.digest, Manifest.image_digest, Manifest.sequence)
        .select_from(Deployment)
        .join(Device, Device.id == Deployment.device_id)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .join(Campaign, Campaign.id == Deployment.campaign_id)
        .join(Manifest, Manifest.id == Campaign.manifest_id)
        .where(Deployment.campaign_id == campaign_id, Deployment.device_id == device_pk)
    ).first()
    if row is None:
        return None
    now = int(utcnow().timestamp())
    return Grant(
        row.slug,
        row.name,
        bytes.fromhex(row.digest),
        bytes.fromhex(row.image_digest),
        campaign_id,
        expires=now + ttl_s,
        sequence=row.sequence,
        installed_at=now,
    )


def server_signing_keys(s: Session) -> list[bytes]:
    """PEM private keys that sign tokens and credentials, oldest first; made on first use."""
    keys = list(s.scalars(select(ServerKey.private_pem).order_by(ServerKey.id)))
    if not keys:
        pem = private_key_pem(generate_private_key("eddsa"))
        s.add(ServerKey(private_pem=pem))
        s.flush()
        keys = [pem]
    return keys


def revoked_key_ids(s: Session) -> dict[str, tuple[bytes, ...]]:
    """Key ids of revoked signers per tenant slug: carried in every notice to that tenant's devices."""
    out: dict[str, list[bytes]] = {}
    for slug, key_id_hex in s.execute(
        select(Tenant.slug, Signer.key_id)
        .join(Tenant, Tenant.id == Signer.tenant_id)
        .where(Signer.revoked_at.is_not(None))
    ):
        out.setdefault(slug, []).append(bytes.fromhex(key_id_hex))
    return {k: tuple(v) for k, v in out.items()}


def protected_images(s: Session) -> set[str]:
    """Image digests of attested campaigns that may still deliver: fetching them needs a token."""
    rows = s.execute(
        select(Manifest.image_digest)
        .join(Campaign, Campaign.manifest_id == Manifest.id)
        .where(Campaign.attestation.is_(True), Campaign.state.in_(ACTIVE))
    ).scalars()
    return set(rows)
