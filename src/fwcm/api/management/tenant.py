"""The calling tenant itself (``GET /api/v1/tenant``): any tenant, fleet or manufacturer."""

from __future__ import annotations

from fastapi import APIRouter

from fwcm.api import schemas as sc
from fwcm.api.deps import MANAGEMENT_ERRORS, AnyTenant, router
from fwcm.store import tenants
from fwcm.store.db import Database


def create_router(db: Database) -> APIRouter:
    api = router(*MANAGEMENT_ERRORS)

    @api.get("/tenant", response_model=sc.TenantOut, tags=["tenant"])
    def get_tenant(t: AnyTenant) -> sc.TenantOut:
        with db.read() as s:
            row = tenants.tenant_by_slug(s, t.slug)
            return sc.TenantOut(id=t.id, slug=t.slug, name=t.name, created_at=row.created_at if row else None)

    return api
