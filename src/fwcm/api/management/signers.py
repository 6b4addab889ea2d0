"""Signers a tenant trusts to sign its manifests: bare public keys or certificates of its CA."""

from __future__ import annotations

from fastapi import APIRouter

from fwcm.api import schemas as sc
from fwcm.api.deps import MANAGEMENT_ERRORS, ApiError, Notify, Tenant, router
from fwcm.config import Settings
from fwcm.manifest import ManifestError
from fwcm.store import trust
from fwcm.store.db import Database


def create_router(db: Database, settings: Settings, notify: Notify) -> APIRouter:
    api = router(*MANAGEMENT_ERRORS)

    @api.post("/signers", response_model=sc.SignerOut, status_code=201, tags=["signers"])
    def add_signer(body: sc.SignerIn, t: Tenant) -> sc.SignerOut:
        """Trust a signer: a bare public key, or a signer certificate issued by the tenant's CA."""
        try:
            with db.session() as s:
                signer = trust.add_signer(
                    s, t.id, body.name, body.public_key_pem, cert_pem=body.cert_pem, root=settings.root_cert()
                )
                return sc.SignerOut.of(signer)
        except ManifestError as exc:
            raise ApiError(422, f"public key refused: {exc}") from None

    @api.get("/signers", response_model=sc.SignerPage, tags=["signers"])
    def list_signers(t: Tenant, limit: sc.Limit = 100, offset: sc.Offset = 0) -> sc.SignerPage:
        """The signers the tenant trusts (and revoked), oldest first."""
        with db.read() as s:
            total, rows = trust.list_signers(s, t.id, limit, offset)
            return sc.SignerPage.of(total, limit, offset, [sc.SignerOut.of(x) for x in rows])

    @api.get("/signers/{name}", response_model=sc.SignerOut, tags=["signers"])
    def get_signer(name: str, t: Tenant) -> sc.SignerOut:
        with db.read() as s:
            return sc.SignerOut.of(trust.get_signer(s, t.id, name))

    @api.post("/signers/{name}/revoke", response_model=sc.SignerOut, tags=["signers"])
    def revoke_signer(name: str, t: Tenant) -> sc.SignerOut:
        """Stop trusting this signer: its manifests are refused, campaigns delivering one are
        cancelled, and every later notice tells the tenant's devices to refuse it too."""
        with db.session() as s:
            signer, cancelled = trust.revoke_signer(s, t.id, name)
            out = sc.SignerOut.of(signer)
        for cid in cancelled:
            notify.campaign_changed(cid)
        return out

    return api
