"""Attestation evidence applied to deployments, as stored: the outstanding nonce consumed, or the
deployment failed with the refusal."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from fwcm import attestation
from fwcm.attestation import Grant
from fwcm.protocol import (
    Result,
)
from fwcm.rollout.states import DeviceState
from fwcm.store.db import aware, utcnow
from fwcm.store.deployments import Target
from fwcm.store.models import (
    Campaign,
    Deployment,
    Device,
    DeviceEvent,
    Manifest,
    Tenant,
)


@dataclass(frozen=True)
class AttestationResult:
    """One evidence report judged: ``grant`` to sign into a token, or ``reason`` it was refused."""

    campaign: int
    manifest_id: int
    target: Target
    grant: Grant | None
    reason: str | None


class AwaitingRow(NamedTuple):
    """A deployment of an attested campaign and what a verdict on its evidence needs to be sent."""

    awaiting: attestation.Awaiting
    target: Target
    manifest_id: int
    tenant_id: int


def awaiting_evidence(s: Session, pairs: Iterable[tuple[int, int]]) -> dict[tuple[int, int], AwaitingRow]:
    """Deployments of attested campaigns among (campaign, device row id) ``pairs``."""
    wanted = list(set(pairs))
    if not wanted:
        return {}
    now = utcnow()
    rows = s.execute(
        select(
            Deployment.campaign_id,
            Deployment.device_id,
            Deployment.state,
            Deployment.attempt,
            Deployment.last_seq,
            Deployment.nonce,
            Deployment.nonce_at,
            Device.attest_key_pem,
            Device.name,
            Device.transport,
            Device.secret,
            Device.tenant_id,
            Tenant.slug,
            Manifest.digest,
            Manifest.image_digest,
            Campaign.manifest_id,
        )
        .join(Device, Device.id == Deployment.device_id)
        .join(Tenant, Tenant.id == Device.tenant_id)
        .join(Campaign, Campaign.id == Deployment.campaign_id)
        .join(Manifest, Manifest.id == Campaign.manifest_id)
        .where(
            tuple_(Deployment.campaign_id, Deployment.device_id).in_(wanted), Campaign.attestation.is_(True)
        )
    ).all()
    out: dict[tuple[int, int], AwaitingRow] = {}
    for r in rows:
        awaiting = attestation.Awaiting(
            attempt=r.attempt,
            last_seq=r.last_seq,
            notified=r.state == DeviceState.NOTIFIED.value,
            nonce=r.nonce,
            nonce_age_s=(now - aware(r.nonce_at)).total_seconds() if r.nonce_at is not None else None,
            key_pem=r.attest_key_pem,
            tenant=r.slug,
            device=r.name,
            manifest_digest=bytes.fromhex(r.digest),
            image_digest=bytes.fromhex(r.image_digest),
        )
        target = Target(r.device_id, r.slug, r.name, r.transport, r.secret, r.attempt)
        out[(r.campaign_id, r.device_id)] = AwaitingRow(awaiting, target, r.manifest_id, r.tenant_id)
    return out


def write_verdicts(
    s: Session, verdicts: Sequence[attestation.Verdict], rows: Mapping[tuple[int, int], AwaitingRow]
) -> list[AttestationResult]:
    """Persist judged evidence: an accepted nonce is consumed and the deployment marked attested;
    a refusal fails the deployment with ATTESTATION_REFUSED and the reason."""
    now = utcnow()
    out: list[AttestationResult] = []
    for v in verdicts:
        row = rows[(v.campaign, v.device_pk)]
        same = (
            Deployment.campaign_id == v.campaign,
            Deployment.device_id == v.device_pk,
            Deployment.attempt == v.attempt,
        )
        if v.refusal is not None:
            _refuse(s, same, v, row.tenant_id, now)
            out.append(AttestationResult(v.campaign, row.manifest_id, row.target, None, v.refusal.reason))
            continue
        s.execute(
            update(Deployment)
            .where(*same)
            .values(nonce=None, attested_at=now, last_seq=v.seq, updated_at=now)
        )
        attested = replace(row.target, attested=True)
        out.append(AttestationResult(v.campaign, row.manifest_id, attested, v.grant, None))
    return out


def _refuse(s: Session, same: tuple[Any, ...], v: attestation.Verdict, tenant_id: int, now: datetime) -> None:
    assert v.refusal is not None
    detail = f"attestation refused: {v.refusal.reason}: {v.refusal}"[:200]
    refused = int(Result.ATTESTATION_REFUSED)
    s.execute(
        update(Deployment)
        .where(*same)
        .values(
            state=DeviceState.FAILED.value,
            result=refused,
            detail=detail,
            nonce=None,
            last_seq=v.seq,
            updated_at=now,
        )
    )
    s.add(
        DeviceEvent(
            tenant_id=tenant_id,
            campaign_id=v.campaign,
            device_id=v.device_pk,
            at=now,
            state=DeviceState.FAILED.value,
            result=refused,
            detail=detail,
        )
    )
