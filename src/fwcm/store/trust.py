"""Whom a tenant trusts to sign its manifests: signers (bare keys or certificates from the tenant's
CA), the tenant CA the operator issued, and revocation.

Every function takes the caller's ``tenant_id`` and filters on it: another tenant's signer is
indistinguishable from a missing one (``NotFound``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from fwcm import manifest, pki
from fwcm.errors import Conflict, Invalid, NotFound
from fwcm.names import check_name
from fwcm.store.campaigns import change_campaign
from fwcm.store.models import Campaign, Manifest, Signer, Tenant, utcnow
from fwcm.store.paging import page
from fwcm.store.tenants import tenant_by_slug


def add_signer(
    s: Session,
    tenant_id: int,
    name: str,
    public_key_pem: str | bytes | None = None,
    *,
    cert_pem: str | bytes | None = None,
    root: x509.Certificate | None = None,
) -> Signer:
    """Trust a signer for this tenant's manifests: a bare public key, or a signer certificate that
    chains to the operator root through the tenant's CA (developer certificates carry the hardware
    IDs their builds may target). Raises ManifestError for a bad key, ChainError for a bad chain."""
    check_name(name, "signer name")
    cert_text: str | None = None
    hardware_ids: list[str] | None = None
    if cert_pem is not None:
        info = _signer_chain(s, tenant_id, cert_pem, root)
        key = info.public_key
        cert_text = pki.cert_pem(pki.load_cert(info.leaf_der)).decode()
        hardware_ids = list(info.hardware_ids) if info.hardware_ids is not None else None
    elif public_key_pem is not None:
        pem = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
        key = manifest.load_public_key(pem)
    else:
        raise Invalid("a signer needs public_key_pem (a bare key) or cert_pem (a signer certificate)")
    kid = manifest.key_id(key).hex()
    for other in s.scalars(
        select(Signer).where(Signer.tenant_id == tenant_id, (Signer.name == name) | (Signer.key_id == kid))
    ):
        if other.name == name:
            raise Conflict(f"signer {name!r} already exists")
        raise Conflict(f"this key is already registered as signer {other.name!r}")
    signer = Signer(
        tenant_id=tenant_id,
        name=name,
        alg=manifest.key_alg(key),
        key_id=kid,
        public_key_pem=manifest.public_key_pem(key).decode(),
        cert_pem=cert_text,
        hardware_ids=hardware_ids,
    )
    s.add(signer)
    s.flush()
    return signer


def _signer_chain(
    s: Session, tenant_id: int, cert_pem: str | bytes, root: x509.Certificate | None
) -> pki.SignerInfo:
    """Validate a signer certificate (optionally followed by its CA) against root and tenant CA."""
    if root is None:
        raise Invalid("this server has no operator root CA configured (FWCM_PKI_ROOT)")
    tenant = s.get(Tenant, tenant_id)
    assert tenant is not None
    if not tenant.ca_cert_pem:
        raise Invalid(f"tenant {tenant.slug!r} has no CA registered; the operator issues one")
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    certs = pki.load_pem_chain(data)
    ca = pki.load_cert(tenant.ca_cert_pem.encode())
    if len(certs) > 1 and pki.cert_der(certs[1]) != pki.cert_der(ca):
        raise pki.ChainError("issuer_mismatch", "the certificate's CA is not this tenant's CA")
    info = pki.validate_chain([pki.cert_der(certs[0]), pki.cert_der(ca)], root)
    if info.tenant != tenant.slug:
        raise pki.ChainError("issuer_mismatch", f"certificate issued for tenant {info.tenant!r}")
    return info


def set_tenant_ca(s: Session, slug: str, ca_pem: str | bytes, root: x509.Certificate) -> Tenant:
    """Register the CA certificate the operator issued to a tenant (checked against the root)."""
    tenant = tenant_by_slug(s, slug)
    if tenant is None:
        raise NotFound(f"tenant {slug!r} not found")
    data = ca_pem.encode() if isinstance(ca_pem, str) else ca_pem
    ca = pki.load_pem_chain(data)[0]
    pki.check_tenant_ca(ca, root)
    if pki.tenant_of(ca) != slug:
        raise pki.ChainError("issuer_mismatch", f"CA issued for tenant {pki.tenant_of(ca)!r}, not {slug!r}")
    tenant.ca_cert_pem = pki.cert_pem(ca).decode()
    return tenant


def list_signers(s: Session, tenant_id: int, limit: int, offset: int) -> tuple[int, Sequence[Signer]]:
    """A page of the tenant's signers, oldest first, and how many it has."""
    return page(s, select(Signer).where(Signer.tenant_id == tenant_id).order_by(Signer.id), limit, offset)


def signer_names(s: Session, tenant_id: int, ids: Iterable[int | None]) -> dict[int, str]:
    """The names of these signers of the tenant, by id."""
    wanted = {i for i in ids if i is not None}
    if not wanted:
        return {}
    rows = s.execute(
        select(Signer.id, Signer.name).where(Signer.tenant_id == tenant_id, Signer.id.in_(wanted))
    )
    return {r.id: r.name for r in rows}


def find_signer(s: Session, tenant_id: int, name: str) -> Signer | None:
    return s.scalar(select(Signer).where(Signer.tenant_id == tenant_id, Signer.name == name))


def get_signer(s: Session, tenant_id: int, name: str) -> Signer:
    signer = find_signer(s, tenant_id, name)
    if signer is None:
        raise NotFound(f"signer {name!r} not found")
    return signer


def signer_name(s: Session, tenant_id: int, signer_id: int | None) -> str | None:
    if signer_id is None:
        return None
    return s.scalar(select(Signer.name).where(Signer.tenant_id == tenant_id, Signer.id == signer_id))


def revoke_signer(s: Session, tenant_id: int, name: str) -> tuple[Signer, list[int]]:
    """Stop trusting a signer: its manifests are refused from now on, and campaigns still
    delivering one are cancelled (devices get the revocation with the cancel notice and refuse
    the image if they have not installed it yet). Returns the signer and the cancelled campaigns."""
    signer = get_signer(s, tenant_id, name)
    cancelled: list[int] = []
    if signer.revoked_at is None:
        signer.revoked_at = utcnow()
        active = s.scalars(
            select(Campaign)
            .join(Manifest, Manifest.id == Campaign.manifest_id)
            .where(
                Campaign.tenant_id == tenant_id,
                Manifest.signer_id == signer.id,
                Campaign.state.in_(("draft", "scheduled", "running", "paused")),
            )
        ).all()
        for c in active:
            change_campaign(s, tenant_id, c.id, "cancel", f"signer {name!r} revoked")
            cancelled.append(c.id)
    return signer, cancelled
