"""Signed SUIT manifests of a tenant: upload (checked against its signers), list, read, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from fwcm.api import schemas as sc
from fwcm.api.deps import MANAGEMENT_ERRORS, Tenant, read_body, router
from fwcm.config import Settings
from fwcm.store import images, trust
from fwcm.store.db import Database


def create_router(db: Database, settings: Settings) -> APIRouter:
    api = router(*MANAGEMENT_ERRORS)

    @api.post(
        "/manifests",
        response_model=sc.ManifestOut,
        status_code=201,
        tags=["manifests"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/cbor": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def upload_manifest(
        request: Request,
        response: Response,
        t: Tenant,
        name: Annotated[str | None, Query(max_length=200)] = None,
    ) -> sc.ManifestOut:
        """Upload a signed SUIT envelope (raw CBOR); refused unless a trusted signer signed it.

        The same manifest uploaded again answers 200 with the stored one (``created`` false).
        """
        limit = settings.max_manifest_bytes
        data = await read_body(request, limit, "manifest")

        def store_manifest() -> sc.ManifestOut:
            with db.session() as s:
                m, created = images.upload_manifest(
                    s, t.id, data, max_bytes=limit, name=name, root=settings.root_cert()
                )
                if not created:
                    response.status_code = 200
                return sc.ManifestOut.of(m, trust.signer_name(s, t.id, m.signer_id), created)

        return await run_in_threadpool(store_manifest)

    @api.get("/manifests", response_model=sc.ManifestPage, tags=["manifests"])
    def list_manifests(t: Tenant, limit: sc.Limit = 100, offset: sc.Offset = 0) -> sc.ManifestPage:
        """The tenant's manifests, oldest first."""
        with db.read() as s:
            total, rows = images.list_manifests(s, t.id, limit, offset)
            names = trust.signer_names(s, t.id, (m.signer_id for m in rows))
            items = [sc.ManifestOut.of(m, names.get(m.signer_id) if m.signer_id else None) for m in rows]
            return sc.ManifestPage.of(total, limit, offset, items)

    @api.get("/manifests/{manifest_id}", response_model=sc.ManifestOut, tags=["manifests"])
    def get_manifest(manifest_id: sc.RowId, t: Tenant) -> sc.ManifestOut:
        with db.read() as s:
            m = images.get_manifest(s, t.id, manifest_id)
            return sc.ManifestOut.of(m, trust.signer_name(s, t.id, m.signer_id))

    @api.delete("/manifests/{manifest_id}", status_code=204, response_class=Response, tags=["manifests"])
    def delete_manifest(manifest_id: sc.RowId, t: Tenant) -> Response:
        """Delete a manifest; refused (409, naming them) while campaigns of the tenant use it."""
        with db.session() as s:
            images.delete_manifest(s, t.id, manifest_id)
        return Response(status_code=204)

    @api.get(
        "/manifests/{manifest_id}/envelope",
        tags=["manifests"],
        response_class=Response,
        responses={200: {"content": {"application/cbor": {}}}},
    )
    def get_envelope(manifest_id: sc.RowId, t: Tenant) -> Response:
        """The exact envelope bytes that were uploaded."""
        with db.session() as s:
            m = images.get_manifest(s, t.id, manifest_id)
            return Response(m.envelope, media_type="application/cbor", headers={"ETag": f'"{m.digest}"'})

    return api
