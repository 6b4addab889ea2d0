"""The signing service's API: the tenant CA and signer keys the server holds, releases signed on
request after their approvals, and the audit chain's check.

Keys are generated in the server's key store (``fwcm.keystore``), never sent anywhere; CA and
signer management need the admin role, requests and approvals what each signer's policy says.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from fwcm import audit_chain, manifest, signing
from fwcm.api import schemas as sc
from fwcm.api.deps import MANAGEMENT_ERRORS, AnyTenant, ApiError, Tenant, TenantCtx, router
from fwcm.config import Settings
from fwcm.keystore import KeyStoreError
from fwcm.roles import Role
from fwcm.server import signing as service
from fwcm.store import audit, trust
from fwcm.store import signing as signing_store
from fwcm.store.db import Database
from fwcm.store.models import Release, SigningKey
from fwcm.store.models import Tenant as TenantRow

R = TypeVar("R")
Alg = Literal["es256", "eddsa"]
RoleName = Literal["viewer", "operator", "admin"]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class CaKeyOut(BaseModel):
    alg: str
    store: str = Field(description="Key store holding the private key: pkcs11 or file")
    public_key_pem: str
    certified: bool = Field(description="The operator root's certificate for it is installed")


class CaCertIn(BaseModel):
    cert_pem: str = Field(max_length=16384, description="The tenant CA certificate the operator root issued")


class IssueIn(BaseModel):
    name: str = Field(max_length=100)
    hardware_ids: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        None, max_length=1000, description="Developer certificate: the only hardware its builds may target"
    )
    alg: Alg = "es256"
    approvals: int | None = Field(
        None, ge=0, le=signing.MAX_APPROVALS, description="Default: 1 (production), 0 (developer)"
    )
    approver_role: RoleName = "admin"
    requester_role: RoleName = "operator"
    days: int = Field(730, ge=1, le=3650)


class HeldSignerOut(BaseModel):
    name: str
    alg: str
    store: str
    key_id: str
    approvals: int = Field(description="Approvals a release needs (not counting the requester)")
    approver_role: str
    requester_role: str
    hardware_ids: list[str] | None
    cert_pem: str | None
    created_by: str
    created_at: sc.Timestamp | None


class HeldSignerPage(sc.Page[HeldSignerOut]):
    pass


class ReleaseIn(BaseModel):
    signer: str = Field(max_length=100)
    sequence: sc.BodyInt = Field(ge=0)
    vendor_id: uuid.UUID
    class_id: uuid.UUID
    image_digest: Sha256
    image_size: sc.BodyInt = Field(ge=0)
    uris: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(min_length=1, max_length=8)
    name: str | None = Field(None, max_length=200)


class ApprovalOut(BaseModel):
    key: str
    role: str
    at: sc.Timestamp


class ReleaseOut(BaseModel):
    id: int
    state: str = Field(description="pending, signed or rejected")
    signer: str
    sequence: int
    vendor_id: str
    class_id: str
    image_digest: str
    image_size: int
    uris: list[str]
    name: str | None
    requested_by: str
    requested_at: sc.Timestamp
    approvals_needed: int
    approvals: list[ApprovalOut]
    decided_by: str | None
    decided_at: sc.Timestamp | None
    reason: str | None
    manifest_id: int | None


class ReleasePage(sc.Page[ReleaseOut]):
    pass


class RejectIn(BaseModel):
    reason: str | None = Field(None, max_length=500)


class AuditVerifyOut(BaseModel):
    ok: bool
    checked: int = Field(description="Chained entries checked")
    unchained: int = Field(description="Entries older than the chain, not checked")
    head: str | None = Field(description="Hash of the newest entry (note it to detect later removals)")
    problems: list[str]


def _caller(t: TenantCtx) -> service.Caller:
    return service.Caller(t.id, t.key_name, t.role)


def _admin(t: TenantCtx) -> None:
    if t.role < Role.ADMIN:
        raise ApiError(403, f"managing server-held keys needs the admin role; this key has {t.role.label}")


def _signer_out(row: SigningKey, hardware_ids: list[str] | None, cert_pem: str | None) -> HeldSignerOut:
    return HeldSignerOut(
        name=row.name,
        alg=row.alg,
        store=row.store,
        key_id=manifest.key_id(manifest.load_public_key(row.public_key_pem.encode())).hex(),
        approvals=row.approvals,
        approver_role=row.approver_role,
        requester_role=row.requester_role,
        hardware_ids=hardware_ids,
        cert_pem=cert_pem,
        created_by=row.created_by,
        created_at=row.created_at,
    )


def create_router(db: Database, settings: Settings) -> APIRouter:
    api = router(*MANAGEMENT_ERRORS, 403, 503)

    async def in_thread(fn: Callable[[], R]) -> R:
        """Run store and key-store work off the event loop; refusals become API errors."""
        try:
            return await run_in_threadpool(fn)
        except service.Refused as exc:
            raise ApiError(403, str(exc)) from None
        except KeyStoreError as exc:
            raise ApiError(503, f"key store: {exc}") from None

    def release_out(s: Session, r: Release) -> ReleaseOut:
        row = s.get(SigningKey, r.signing_key_id)
        assert row is not None
        return ReleaseOut(
            id=r.id,
            state=r.state,
            signer=row.name,
            sequence=r.sequence,
            vendor_id=r.vendor_id,
            class_id=r.class_id,
            image_digest=r.image_digest,
            image_size=r.image_size,
            uris=list(r.uris),
            name=r.name,
            requested_by=r.requested_by,
            requested_at=r.requested_at,
            approvals_needed=row.approvals,
            approvals=[
                ApprovalOut(key=a.key_name, role=a.role, at=a.at) for a in signing_store.approvals(s, r.id)
            ],
            decided_by=r.decided_by,
            decided_at=r.decided_at,
            reason=r.reason,
            manifest_id=r.manifest_id,
        )

    @api.post("/signing/ca", response_model=CaKeyOut, status_code=201, tags=["signing"])
    async def create_ca(t: Tenant, alg: Alg = "es256") -> CaKeyOut:
        """Generate the tenant CA key inside the server's key store (admin).  Its public key is then
        certified by the operator root, offline, and installed with ``PUT /signing/ca/cert``."""
        _admin(t)

        def run() -> CaKeyOut:
            with db.session() as s:
                row = service.create_ca(s, settings.keystore(), _caller(t), alg)
                return CaKeyOut(
                    alg=row.alg, store=row.store, public_key_pem=row.public_key_pem, certified=False
                )

        return await in_thread(run)

    @api.get("/signing/ca", response_model=CaKeyOut, tags=["signing"])
    def get_ca(t: Tenant) -> CaKeyOut:
        with db.read() as s:
            row = service.ca_key(s, t.id)
            tenant = s.get(TenantRow, t.id)
            certified = tenant is not None and bool(tenant.ca_cert_pem)
            return CaKeyOut(
                alg=row.alg, store=row.store, public_key_pem=row.public_key_pem, certified=certified
            )

    @api.put("/signing/ca/cert", response_model=CaKeyOut, tags=["signing"])
    async def install_ca_cert(body: CaCertIn, t: Tenant) -> CaKeyOut:
        """Install the operator root's certificate for the held CA key (admin)."""
        _admin(t)

        def run() -> CaKeyOut:
            with db.session() as s:
                service.install_ca_cert(s, _caller(t), body.cert_pem, settings.root_cert())
                row = service.ca_key(s, t.id)
                return CaKeyOut(
                    alg=row.alg, store=row.store, public_key_pem=row.public_key_pem, certified=True
                )

        return await in_thread(run)

    @api.post("/signing/signers", response_model=HeldSignerOut, status_code=201, tags=["signing"])
    async def issue_signer(body: IssueIn, t: Tenant) -> HeldSignerOut:
        """Generate a signer key in the key store and issue its certificate from the held tenant CA
        (admin); the tenant trusts it from then on.  With ``hardware_ids``: a developer signer."""
        _admin(t)
        developer = bool(body.hardware_ids)
        approvals = (
            body.approvals if body.approvals is not None else signing.default_policy(developer).approvals
        )
        try:
            policy = signing.Policy(
                approvals, Role.parse(body.approver_role), Role.parse(body.requester_role)
            )
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None

        def run() -> HeldSignerOut:
            with db.session() as s:
                signer, row = service.issue_signer(
                    s,
                    settings.keystore(),
                    _caller(t),
                    settings.root_cert(),
                    body.name,
                    hardware_ids=body.hardware_ids,
                    alg=body.alg,
                    policy=policy,
                    days=body.days,
                )
                return _signer_out(row, signer.hardware_ids, signer.cert_pem)

        return await in_thread(run)

    @api.get("/signing/signers", response_model=HeldSignerPage, tags=["signing"])
    def list_held_signers(t: Tenant, limit: sc.Limit = 100, offset: sc.Offset = 0) -> HeldSignerPage:
        """The signers whose keys the server holds, with their release policy, oldest first."""
        with db.read() as s:
            total, rows = signing_store.held_signers(s, t.id, limit, offset)
            items = []
            for row in rows:
                sg = trust.get_signer(s, t.id, row.name)
                items.append(_signer_out(row, sg.hardware_ids, sg.cert_pem))
            return HeldSignerPage.of(total, limit, offset, items)

    @api.post("/releases", response_model=ReleaseOut, status_code=201, tags=["signing"])
    async def request_release(body: ReleaseIn, t: Tenant) -> ReleaseOut:
        """Ask a held signer to sign a manifest for an uploaded image.  Answered ``pending`` until
        the signer's policy has its approvals, ``signed`` (with the stored manifest) at once when
        it needs none."""

        def run() -> ReleaseOut:
            req = service.ReleaseRequest(
                body.signer,
                body.sequence,
                body.vendor_id,
                body.class_id,
                body.image_digest,
                body.image_size,
                tuple(body.uris),
                body.name,
            )
            with db.session() as s:
                r = service.request_release(
                    s, settings.keystore(), _caller(t), settings.root_cert(), req, settings.max_manifest_bytes
                )
                return release_out(s, r)

        return await in_thread(run)

    @api.get("/releases", response_model=ReleasePage, tags=["signing"])
    def list_releases(
        t: Tenant,
        limit: sc.Limit = 100,
        offset: sc.Offset = 0,
        state: Annotated[Literal["pending", "signed", "rejected"] | None, Query()] = None,
    ) -> ReleasePage:
        with db.read() as s:
            total, rows = signing_store.list_releases(s, t.id, limit, offset, state)
            return ReleasePage.of(total, limit, offset, [release_out(s, r) for r in rows])

    @api.get("/releases/{release_id}", response_model=ReleaseOut, tags=["signing"])
    def get_release(release_id: sc.RowId, t: Tenant) -> ReleaseOut:
        with db.read() as s:
            return release_out(s, signing_store.get_release(s, t.id, release_id))

    @api.post("/releases/{release_id}/approve", response_model=ReleaseOut, tags=["signing"])
    async def approve_release(release_id: sc.RowId, t: Tenant) -> ReleaseOut:
        """Approve a pending release with this key; the requesting key's own approval is refused
        (403).  The last approval needed makes the signature."""

        def run() -> ReleaseOut:
            with db.session() as s:
                r = service.approve(
                    s,
                    settings.keystore(),
                    _caller(t),
                    settings.root_cert(),
                    release_id,
                    settings.max_manifest_bytes,
                )
                return release_out(s, r)

        return await in_thread(run)

    @api.post("/releases/{release_id}/reject", response_model=ReleaseOut, tags=["signing"])
    async def reject_release(release_id: sc.RowId, t: Tenant, body: RejectIn | None = None) -> ReleaseOut:
        def run() -> ReleaseOut:
            with db.session() as s:
                r = service.reject(s, _caller(t), release_id, body.reason if body else None)
                return release_out(s, r)

        return await in_thread(run)

    @api.get("/audit/verify", response_model=AuditVerifyOut, tags=["audit"])
    def verify_audit(t: AnyTenant) -> AuditVerifyOut:
        """Walk the tenant's audit chain: every entry's hash and its link to the one before."""
        with db.read() as s:
            report = audit_chain.verify(audit.chain(s, t.id))
        return AuditVerifyOut(
            ok=report.ok,
            checked=report.checked,
            unchained=report.unchained,
            head=report.head,
            problems=list(report.problems),
        )

    return api
