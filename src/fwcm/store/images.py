"""Firmware images of a tenant: payloads (stored files, content-addressed by SHA-256) and the signed
manifests that describe them.

A manifest is stored only once it verifies against one of the tenant's trusted, unrevoked signers
(and, when it carries a certificate chain, against the operator root through the tenant's CA).
Every function takes the caller's ``tenant_id`` and filters on it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cryptography import x509
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fwcm import manifest, pki
from fwcm.errors import Conflict, Invalid, NotFound, TooLarge
from fwcm.store.models import BIGINT_MAX, Campaign, Delta, Deployment, Manifest, Payload, Signer, Tenant
from fwcm.store.paging import page

log = logging.getLogger(__name__)


def record_payload(
    s: Session, tenant_id: int, sha256: str, size: int, name: str | None = None
) -> tuple[Payload, bool]:
    """Record that the tenant owns a stored file; idempotent (returns ``created`` False)."""
    existing = s.scalar(select(Payload).where(Payload.tenant_id == tenant_id, Payload.sha256 == sha256))
    if existing is not None:
        return existing, False
    payload = Payload(tenant_id=tenant_id, sha256=sha256, size=size, name=name)
    try:
        with s.begin_nested():
            s.add(payload)
            s.flush()
    except IntegrityError:  # a concurrent upload of the same image won the race
        existing = s.scalar(select(Payload).where(Payload.tenant_id == tenant_id, Payload.sha256 == sha256))
        if existing is None:
            raise
        return existing, False
    return payload, True


def list_payloads(s: Session, tenant_id: int, limit: int, offset: int) -> tuple[int, Sequence[Payload]]:
    """A page of the tenant's payloads, oldest first, and how many it has."""
    return page(s, select(Payload).where(Payload.tenant_id == tenant_id).order_by(Payload.id), limit, offset)


def get_payload(s: Session, tenant_id: int, sha256: str) -> Payload:
    payload = s.scalar(select(Payload).where(Payload.tenant_id == tenant_id, Payload.sha256 == sha256))
    if payload is None:
        raise NotFound(f"payload {sha256} not found")
    return payload


def payload_is_published(s: Session, sha256: str) -> bool:
    """Whether any tenant owns this image: devices fetch by digest without credentials."""
    return s.scalar(select(Payload.id).where(Payload.sha256 == sha256).limit(1)) is not None


def upload_manifest(
    s: Session,
    tenant_id: int,
    data: bytes,
    *,
    max_bytes: int = 64 * 1024,
    name: str | None = None,
    root: x509.Certificate | None = None,
) -> tuple[Manifest, bool]:
    """Decode and verify an envelope against the tenant's trusted signers, then store it.

    An envelope carrying an ``x5chain`` is also checked like a device checks it: the chain must
    lead to the operator ``root`` through this tenant's CA. Raises ManifestError (malformed),
    SignatureError (not signed by a registered, unrevoked signer) or ChainError (bad chain).
    Uploading the same manifest twice returns the stored one with ``created`` False.
    """
    if len(data) > max_bytes:
        raise TooLarge(f"manifest of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    env = manifest.decode_envelope(data)
    if any(sig.x5chain for sig in env.signatures):
        if root is None:
            raise Invalid("manifest carries a certificate chain but no operator root CA is configured")
        certified = pki.verify_manifest(env, root)
        slug = s.scalar(select(Tenant.slug).where(Tenant.id == tenant_id))
        if certified.tenant != slug:
            raise pki.ChainError("issuer_mismatch", f"signed under the CA of tenant {certified.tenant!r}")
    all_signers = list(s.scalars(select(Signer).where(Signer.tenant_id == tenant_id)))
    signers = [sg for sg in all_signers if sg.revoked_at is None]
    revoked = {bytes.fromhex(sg.key_id): sg.name for sg in all_signers if sg.revoked_at is not None}
    for sig in env.signatures:
        if sig.kid in revoked:
            raise manifest.SignatureError(f"signed by revoked signer {revoked[sig.kid]!r}")
    if not signers:
        raise manifest.SignatureError("no trusted signers registered; add one with `fwcm signer add`")
    by_kid = {sg.key_id: sg for sg in signers}
    keys = [manifest.load_public_key(sg.public_key_pem.encode()) for sg in by_kid.values()]
    verified = manifest.verify_envelope(env, keys)
    signer = by_kid[manifest.key_id(verified).hex()]
    info = env.info
    for what, value in (("sequence number", info.sequence), ("image size", info.image_size)):
        if value > BIGINT_MAX:
            raise Invalid(f"manifest refused: its {what} {value} exceeds the largest storable, {BIGINT_MAX}")
    digest = env.digest.hex()
    existing = s.scalar(select(Manifest).where(Manifest.tenant_id == tenant_id, Manifest.digest == digest))
    if existing is not None:
        return existing, False
    row = Manifest(
        tenant_id=tenant_id,
        digest=digest,
        sequence=info.sequence,
        vendor_id=str(info.vendor_id),
        class_id=str(info.class_id),
        image_digest=info.image_digest.hex(),
        image_size=info.image_size,
        uris=list(info.uris),
        envelope=bytes(data),
        signer_id=signer.id,
        name=name,
    )
    s.add(row)
    s.flush()
    log.info("tenant %d stored manifest %d (sequence %d)", tenant_id, row.id, info.sequence)
    return row, True


def list_manifests(s: Session, tenant_id: int, limit: int, offset: int) -> tuple[int, Sequence[Manifest]]:
    """A page of the tenant's manifests, oldest first, and how many it has."""
    query = select(Manifest).where(Manifest.tenant_id == tenant_id).order_by(Manifest.id)
    return page(s, query, limit, offset)


def get_manifest(s: Session, tenant_id: int, manifest_id: int) -> Manifest:
    row = s.scalar(select(Manifest).where(Manifest.tenant_id == tenant_id, Manifest.id == manifest_id))
    if row is None:
        raise NotFound(f"manifest {manifest_id} not found")
    return row


def _listed(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:10])
    return shown + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def delete_payload(s: Session, tenant_id: int, sha256: str) -> bool:
    """Forget the tenant's payload; refused while a manifest of the tenant describes it (as its
    image, or as the patch of a delta manifest the server made).  True when no tenant holds the
    image any more (its file may go)."""
    payload = get_payload(s, tenant_id, sha256)
    patch_of = select(Delta.delta_manifest_id).where(
        Delta.tenant_id == tenant_id, Delta.patch_digest == sha256
    )
    users = s.scalars(
        select(Manifest.id)
        .where(
            Manifest.tenant_id == tenant_id,
            or_(Manifest.image_digest == sha256, Manifest.id.in_(patch_of)),
        )
        .order_by(Manifest.id)
    ).all()
    if users:
        raise Conflict(f"payload {sha256} is used by manifest {_listed(users)}; delete those first")
    s.delete(payload)
    s.flush()
    log.info("tenant %d deleted payload %s", tenant_id, sha256)
    return not payload_is_published(s, sha256)


def delete_manifest(s: Session, tenant_id: int, manifest_id: int) -> None:
    """Delete a manifest; refused while a campaign of the tenant uses it (as its manifest or as
    the variant some of its devices get)."""
    manifest_row = get_manifest(s, tenant_id, manifest_id)
    variant_of = select(Deployment.campaign_id).where(
        Deployment.tenant_id == tenant_id, Deployment.manifest_id == manifest_id
    )
    users = s.scalars(
        select(Campaign.id)
        .where(
            Campaign.tenant_id == tenant_id,
            or_(Campaign.manifest_id == manifest_id, Campaign.id.in_(variant_of)),
        )
        .order_by(Campaign.id)
    ).all()
    users = sorted(set(users) | _consent_variant_users(s, tenant_id, manifest_id))
    if users:
        raise Conflict(f"manifest {manifest_id} is used by campaign {_listed(users)}; delete those first")
    s.delete(manifest_row)
    s.flush()
    log.info("tenant %d deleted manifest %d", tenant_id, manifest_id)


def _consent_variant_users(s: Session, tenant_id: int, manifest_id: int) -> set[int]:
    """Campaigns whose consent rules name the manifest as a variant (stored JSON, read by name)."""
    rows = s.execute(
        select(Campaign.id, Campaign.consent).where(
            Campaign.tenant_id == tenant_id, Campaign.consent.is_not(None)
        )
    )
    out = set()
    for r in rows:
        variants = (r.consent or {}).get("variants") or {}
        if isinstance(variants, dict) and manifest_id in {v for v in variants.values() if isinstance(v, int)}:
            out.add(r.id)
    return out
