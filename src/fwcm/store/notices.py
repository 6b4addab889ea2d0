"""What notices are made of, as stored: the deployment a device's notice speaks for, credentials
due, the server's signing keys, revoked signers and protected images."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from sqlalchemy import (
    Row,
    Select,
    and_,
    func,
    or_,
    select,
    tuple_,
)
from sqlalchemy.orm import Session

from fwcm.attestation import Grant
from fwcm.manifest import generate_private_key, private_key_pem
from fwcm.rollout.states import DEVICE_TERMINAL, CampaignState, DeviceState
from fwcm.store.db import utcnow
from fwcm.store.deployments import Target, target_of, targets
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


def _with_campaign(*columns: Any) -> Select[*tuple[Any, ...]]:
    """``deployments.targets()`` joined to the campaign, with more columns."""
    return (
        targets()
        .add_columns(Deployment.campaign_id, *columns)
        .join(Campaign, Campaign.id == Deployment.campaign_id)
    )


def _newest(s: Session, query: Select[*tuple[Any, ...]], tenant: str, device: str) -> Row[Any] | None:
    """The newest deployment of one device (by tenant slug and name) the query selects."""
    newest = query.where(Tenant.slug == tenant, Device.name == device).order_by(Deployment.campaign_id.desc())
    return s.execute(newest.limit(1)).first()


def speaking_deployment(s: Session, tenant: str, device: str) -> Speaking | None:
    """The newest deployment of a device in progress in a live or cancelled campaign, or withdrawn
    (cancel, quorum not met, group abort) after it was notified: the device may have started, so
    it must see the withdrawal."""
    in_flight = [st.value for st in DEVICE_TERMINAL] + [DeviceState.PENDING.value]
    withdrawn = and_(Deployment.state == DeviceState.CANCELLED.value, Deployment.attempt > 0)
    live = [CampaignState.RUNNING.value, CampaignState.PAUSED.value, CampaignState.CANCELLED.value]
    ended = [CampaignState.CANCELLED.value, CampaignState.STOPPED.value]
    query = _with_campaign(
        func.coalesce(Deployment.manifest_id, Campaign.manifest_id).label("notice_manifest_id"),
        Campaign.state.label("campaign_state"),
        Deployment.state,
        Campaign.group_decision,
        Deployment.detail,
    ).where(
        or_(
            and_(Deployment.state.notin_(in_flight), Campaign.state.in_(live)),
            and_(withdrawn, or_(Campaign.state.in_(ended), Campaign.group_decision == "abort")),
        )
    )
    row = _newest(s, query, tenant, device)
    if row is None:
        return None
    return Speaking(
        row.campaign_id,
        target_of(row),
        row.notice_manifest_id,
        DeviceState(row.state),
        CampaignState(row.campaign_state),
        row.group_decision,
        row.detail,
    )


_ATTESTED_SUCCESS = (Campaign.attestation.is_(True), Deployment.state == DeviceState.SUCCEEDED.value)


def credential_targets(s: Session, pairs: Iterable[tuple[int, int]]) -> list[tuple[int, Target, int]]:
    """Succeeded deployments of attested campaigns among (campaign, device) ``pairs``: (campaign,
    target, the campaign's manifest)."""
    wanted = list(set(pairs))
    if not wanted:
        return []
    # most campaigns are not attested: one small lookup spares the join over every pair
    attested = set(
        s.scalars(
            select(Campaign.id).where(Campaign.id.in_({c for c, _ in wanted}), Campaign.attestation.is_(True))
        )
    )
    wanted = [(c, d) for c, d in wanted if c in attested]
    if not wanted:
        return []
    query = _with_campaign(Campaign.manifest_id.label("campaign_manifest_id")).where(
        tuple_(Deployment.campaign_id, Deployment.device_id).in_(wanted), *_ATTESTED_SUCCESS
    )
    return [(r.campaign_id, target_of(r), r.campaign_manifest_id) for r in s.execute(query)]


def last_attested_success(s: Session, tenant: str, device: str) -> tuple[int, Target, int] | None:
    """The device's newest succeeded deployment of an attested campaign: its credential is due."""
    query = _with_campaign(Campaign.manifest_id.label("campaign_manifest_id")).where(*_ATTESTED_SUCCESS)
    row = _newest(s, query, tenant, device)
    return None if row is None else (row.campaign_id, target_of(row), row.campaign_manifest_id)


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
