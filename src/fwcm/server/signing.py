"""The signing service: tenant CA and signer keys held in the server's key store, certificates
issued from the held CA, and manifests signed on request once a release has its approvals.

Each function runs inside the caller's transaction and records what it did in the tenant's
hash-chained audit log (``fwcm.store.audit.event``) in that same transaction.  The policy rules
are ``fwcm.signing``'s; certificate and manifest building are ``fwcm.pki``'s and
``fwcm.manifest``'s, the same as local signing uses.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from sqlalchemy.orm import Session

from fwcm import manifest, pki, signing
from fwcm.errors import Conflict, Invalid, NotFound
from fwcm.keystore import KeyHandle, KeyStore, KeyStoreError
from fwcm.names import check_name
from fwcm.roles import Role
from fwcm.store import audit, images, tenants, trust
from fwcm.store import signing as sq
from fwcm.store.models import Release, Signer, SigningKey, Tenant, utcnow

log = logging.getLogger(__name__)

CA = "ca"
SIGNER = sq.SIGNER


class Refused(Exception):
    """The caller's key may not do this (HTTP 403)."""


@dataclass(frozen=True)
class Caller:
    tenant_id: int
    key_name: str
    role: Role


def _event(s: Session, who: Caller, what: str, **details: Any) -> None:
    audit.event(s, who.tenant_id, who.key_name, who.role.label, what, **details)


def _label(tenant_id: int, purpose: str) -> str:
    """A fresh, unguessable-enough label: a retried or failed request never collides with a key."""
    return f"fwcm-{tenant_id}-{purpose}-{secrets.token_hex(8)}"


def _generate(
    s: Session, ks: KeyStore, who: Caller, purpose: str, name: str, alg: str
) -> tuple[SigningKey, KeyHandle]:
    handle = ks.generate(_label(who.tenant_id, purpose), alg)
    pub = handle.public_key()
    row = sq.add_key(
        s,
        tenant_id=who.tenant_id,
        purpose=purpose,
        name=name,
        store=ks.kind,
        label=handle.label,
        alg=manifest.key_alg(pub),
        public_key_pem=manifest.public_key_pem(pub).decode(),
        approvals=0,
        approver_role=Role.ADMIN.label,
        requester_role=Role.OPERATOR.label,
        created_by=who.key_name,
    )
    _event(
        s, who, "key.generated", purpose=purpose, name=name, store=ks.kind, key_id=manifest.key_id(pub).hex()
    )
    return row, handle


def _held(ks: KeyStore, row: SigningKey) -> KeyHandle:
    if row.store != ks.kind:
        raise Invalid(f"the key of {row.name!r} is held in the {row.store} key store, not this server's")
    return ks.get(row.label)


# --- the tenant CA ---------------------------------------------------------------------------------


def create_ca(s: Session, ks: KeyStore, who: Caller, alg: str = "es256") -> SigningKey:
    """Generate the tenant CA key inside the key store; the operator root then certifies its
    public key (``install_ca_cert``).  One CA key per tenant."""
    if sq.find_key(s, who.tenant_id, CA, CA) is not None:
        raise Conflict("this tenant's CA key exists already")
    row, _ = _generate(s, ks, who, CA, CA, alg)
    return row


def ca_key(s: Session, tenant_id: int) -> SigningKey:
    row = sq.find_key(s, tenant_id, CA, CA)
    if row is None:
        raise NotFound("this tenant has no CA key on the server; create one with `fwcm ca create`")
    return row


def install_ca_cert(s: Session, who: Caller, cert_pem: str, root: x509.Certificate | None) -> Tenant:
    """Register the certificate the operator root issued for the held CA key."""
    if root is None:
        raise Invalid("this server has no operator root CA configured (FWCM_PKI_ROOT)")
    row = ca_key(s, who.tenant_id)
    cert = pki.load_pem_chain(cert_pem.encode())[0]
    if manifest.key_id(manifest.public_of(cert.public_key())) != manifest.key_id(  # type: ignore[arg-type]
        manifest.load_public_key(row.public_key_pem.encode())
    ):
        raise Invalid("the certificate is not for this tenant's CA key")
    tenant = tenants.get_tenant(s, who.tenant_id)
    trust.set_tenant_ca(s, tenant.slug, cert_pem, root)
    _event(
        s,
        who,
        "certificate.installed",
        purpose=CA,
        serial=f"{cert.serial_number:x}",
        digest=_fingerprint(cert),
    )
    return tenant


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(pki.cert_der(cert)).hexdigest()


# --- signers ---------------------------------------------------------------------------------------


def issue_signer(
    s: Session,
    ks: KeyStore,
    who: Caller,
    root: x509.Certificate | None,
    name: str,
    *,
    hardware_ids: Sequence[str] | None = None,
    alg: str = "es256",
    policy: signing.Policy | None = None,
    days: int = 730,
) -> tuple[Signer, SigningKey]:
    """Generate a signer key inside the key store and certify it with the held tenant CA (a
    developer certificate when ``hardware_ids`` are given); the tenant then trusts it like any
    certified signer."""
    check_name(name, "signer name")
    if root is None:
        raise Invalid("this server has no operator root CA configured (FWCM_PKI_ROOT)")
    tenant = tenants.get_tenant(s, who.tenant_id)
    if not tenant.ca_cert_pem:
        raise Invalid("this tenant's CA has no certificate yet; install it with `fwcm ca create`")
    if sq.find_key(s, who.tenant_id, SIGNER, name) is not None or trust.find_signer(s, who.tenant_id, name):
        raise Conflict(f"signer {name!r} already exists")
    ca_cert = pki.load_cert(tenant.ca_cert_pem.encode())
    ca_handle = _held(ks, ca_key(s, who.tenant_id))
    hw = list(hardware_ids) if hardware_ids else None
    policy = policy or signing.default_policy(hw is not None)
    row, handle = _generate(s, ks, who, SIGNER, name, alg)
    row.approvals = policy.approvals
    row.approver_role = policy.approver_role.label
    row.requester_role = policy.requester_role.label
    try:
        cert = pki.make_signer(ca_handle, ca_cert, handle.public_key(), name, hardware_ids=hw, days=days)
    except ValueError as exc:
        raise Invalid(f"cannot issue the certificate: {exc}") from None
    signer = trust.add_signer(s, who.tenant_id, name, cert_pem=pki.cert_pem(cert), root=root)
    _event(
        s,
        who,
        "certificate.issued",
        signer=name,
        serial=f"{cert.serial_number:x}",
        digest=_fingerprint(cert),
        hardware_ids=",".join(hw) if hw else None,
    )
    return signer, row


def policy_of(row: SigningKey) -> signing.Policy:
    return signing.Policy(row.approvals, Role.parse(row.approver_role), Role.parse(row.requester_role))


# --- releases --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseRequest:
    signer: str
    sequence: int
    vendor_id: uuid.UUID
    class_id: uuid.UUID
    image_digest: str
    image_size: int
    uris: tuple[str, ...]
    name: str | None = None


def request_release(
    s: Session, ks: KeyStore, who: Caller, root: x509.Certificate | None, req: ReleaseRequest, max_bytes: int
) -> Release:
    """Ask a held signer to sign a manifest for an uploaded image; signed at once when its policy
    needs no approval."""
    row = sq.find_key(s, who.tenant_id, SIGNER, req.signer)
    if row is None:
        raise NotFound(f"signer {req.signer!r} is not held by the server")
    refused = signing.request_refusal(policy_of(row), who.role)
    if refused:
        raise Refused(refused)
    signer = trust.get_signer(s, who.tenant_id, req.signer)
    if signer.revoked_at is not None:
        raise Conflict(f"signer {req.signer!r} is revoked")
    try:
        payload = images.get_payload(s, who.tenant_id, req.image_digest)
    except NotFound:
        raise Invalid(f"no uploaded image has SHA-256 {req.image_digest}; upload it first") from None
    if payload.size != req.image_size:
        raise Invalid(f"the uploaded image is {payload.size} bytes, not {req.image_size}")
    info = _info(req.sequence, req.vendor_id, req.class_id, req.image_digest, req.image_size, req.uris)
    manifest.encode.encode_manifest(info)  # refuse what could never be signed, before anyone approves it
    release = sq.add_release(
        s,
        tenant_id=who.tenant_id,
        signing_key_id=row.id,
        state="pending",
        sequence=req.sequence,
        vendor_id=str(req.vendor_id),
        class_id=str(req.class_id),
        image_digest=req.image_digest,
        image_size=req.image_size,
        uris=list(req.uris),
        name=req.name,
        requested_by=who.key_name,
        requested_at=utcnow(),
    )
    _event(s, who, "signature.requested", release=release.id, signer=row.name, digest=req.image_digest)
    _sign_if_ready(s, ks, who, root, release, row, max_bytes)
    return release


def approve(
    s: Session, ks: KeyStore, who: Caller, root: x509.Certificate | None, release_id: int, max_bytes: int
) -> Release:
    """Record this key's approval; the signature is made once the approvals suffice."""
    release = _pending(s, who.tenant_id, release_id)
    row = sq.key_of(s, release)
    refused = signing.approval_refusal(policy_of(row), release.requested_by, who.key_name, who.role)
    if refused:
        raise Refused(refused)
    if any(a.key_name == who.key_name for a in sq.approvals(s, release.id)):
        raise Conflict(f"key {who.key_name!r} approved release {release.id} already")
    sq.add_approval(s, release.id, who.key_name, who.role.label)
    _event(s, who, "signature.approved", release=release.id, signer=row.name, digest=release.image_digest)
    _sign_if_ready(s, ks, who, root, release, row, max_bytes)
    return release


def reject(s: Session, who: Caller, release_id: int, reason: str | None) -> Release:
    """Refuse a pending release: it is never signed.  Anyone who could approve it, or its requester."""
    release = _pending(s, who.tenant_id, release_id)
    row = sq.key_of(s, release)
    if who.key_name != release.requested_by and who.role < policy_of(row).approver_role:
        raise Refused(
            f"rejecting needs the {policy_of(row).approver_role.label} role (or the requesting key)"
        )
    release.state = "rejected"
    release.decided_by, release.decided_at, release.reason = who.key_name, utcnow(), reason
    _event(s, who, "signature.rejected", release=release.id, signer=row.name, digest=release.image_digest)
    return release


def _pending(s: Session, tenant_id: int, release_id: int) -> Release:
    release = sq.get_release(s, tenant_id, release_id, lock=True)
    if release.state != "pending":
        raise Conflict(f"release {release_id} is {release.state}")
    return release


def _info(
    sequence: int,
    vendor: uuid.UUID | str,
    klass: uuid.UUID | str,
    digest: str,
    size: int,
    uris: Sequence[str],
) -> manifest.ManifestInfo:
    try:
        image_digest = bytes.fromhex(digest)
    except ValueError:
        raise Invalid("image_digest must be 64 hex digits") from None
    return manifest.ManifestInfo(
        sequence=sequence,
        vendor_id=uuid.UUID(str(vendor)),
        class_id=uuid.UUID(str(klass)),
        image_digest=image_digest,
        image_size=size,
        uris=tuple(uris),
    )


def _chain(s: Session, tenant_id: int, row: SigningKey) -> list[bytes]:
    """The certificate chain a held signer's manifests carry: its certificate, then the tenant CA's."""
    tenant = tenants.get_tenant(s, tenant_id)
    signer = trust.get_signer(s, tenant_id, row.name)
    if not tenant.ca_cert_pem or not signer.cert_pem:
        raise Invalid(f"signer {row.name!r} has no certificate chain to sign with")
    return [
        pki.cert_der(pki.load_cert(signer.cert_pem.encode())),
        pki.cert_der(pki.load_cert(tenant.ca_cert_pem.encode())),
    ]


def delta_signer(s: Session, tenant_id: int, manifest_id: int) -> SigningKey | None:
    """The held key that signed this manifest's release, which also signs its deltas; None when
    the manifest was signed elsewhere (the server cannot sign for it)."""
    return sq.release_key(s, tenant_id, manifest_id)


def sign_delta(
    s: Session,
    ks: KeyStore,
    who: Caller,
    root: x509.Certificate | None,
    row: SigningKey,
    target: manifest.ManifestInfo,
    info: manifest.ManifestInfo,
    max_bytes: int,
) -> int:
    """Sign a delta manifest with the key of the release it leads to, and store it; returns its id.

    The approval of a release covers its deltas: a delta manifest is signed only when it makes
    exactly the approved image (same digest, size, sequence, vendor and class), which the device
    checks after patching, so the key signs no image that was not approved.
    """
    same = (info.image_digest, info.image_size, info.sequence, info.vendor_id, info.class_id)
    if info.delta is None or same != (
        target.image_digest,
        target.image_size,
        target.sequence,
        target.vendor_id,
        target.class_id,
    ):
        raise Invalid("a delta manifest must make exactly the image of the release it leads to")
    envelope = manifest.build_envelope(info, _held(ks, row), x5chain=_chain(s, who.tenant_id, row))
    stored, _ = images.upload_manifest(s, who.tenant_id, envelope, max_bytes=max_bytes, root=root)
    _event(
        s,
        who,
        "delta.signed",
        signer=row.name,
        digest=stored.digest,
        image=info.image_digest.hex(),
        base=info.delta.base_digest.hex(),
        patch=info.delta.patch_digest.hex(),
    )
    return stored.id


def _sign_if_ready(
    s: Session,
    ks: KeyStore,
    who: Caller,
    root: x509.Certificate | None,
    release: Release,
    row: SigningKey,
    max_bytes: int,
) -> None:
    """Make the signature when the approvals suffice, and store the manifest exactly as an
    uploaded one is stored (the same checks: chain, trusted signer, bounds)."""
    given = [(a.key_name, Role.parse(a.role)) for a in sq.approvals(s, release.id)]
    if not signing.ready(policy_of(row), release.requested_by, given):
        return
    chain = _chain(s, release.tenant_id, row)
    info = _info(
        release.sequence,
        release.vendor_id,
        release.class_id,
        release.image_digest,
        release.image_size,
        release.uris,
    )
    try:
        envelope = manifest.build_envelope(info, _held(ks, row), x5chain=chain)
    except KeyStoreError:
        log.exception("signing release %d with %s failed", release.id, row.label)
        raise
    stored, _ = images.upload_manifest(
        s, release.tenant_id, envelope, max_bytes=max_bytes, name=release.name, root=root
    )
    release.state = "signed"
    release.manifest_id = stored.id
    release.decided_by, release.decided_at = who.key_name, utcnow()
    _event(
        s,
        who,
        "signature.made",
        release=release.id,
        signer=row.name,
        digest=stored.digest,
        image=release.image_digest,
    )
    log.info("release %d signed by %s (%s): manifest %d", release.id, row.name, ks.kind, stored.id)
