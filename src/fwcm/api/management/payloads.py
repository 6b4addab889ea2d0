"""Firmware payloads of a tenant: upload (content-addressed by SHA-256), list, read, download,
delete.

Devices do not use these routes: they fetch published payloads from ``fwcm.api.devices``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from fwcm.api import schemas as sc
from fwcm.api.deps import MANAGEMENT_ERRORS, ApiError, Tenant, get_and_head, router
from fwcm.api.ranges import file_response
from fwcm.config import Settings
from fwcm.store import images
from fwcm.store.db import Database
from fwcm.store.payloads import EmptyPayload, PayloadStore, PayloadTooLarge, is_sha256


def payload_sha(sha256: str) -> str:
    """The digest in canonical (lower-case) form; anything else is a payload that cannot exist (404)."""
    sha = sha256.lower()
    if not is_sha256(sha):
        raise ApiError(404, f"payload {sha256} not found")
    return sha


def create_router(db: Database, settings: Settings, store: PayloadStore) -> APIRouter:
    api = router(*MANAGEMENT_ERRORS)

    @api.post(
        "/payloads",
        response_model=sc.PayloadOut,
        status_code=201,
        tags=["payloads"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def upload_payload(
        request: Request,
        response: Response,
        t: Tenant,
        name: Annotated[str | None, Query(max_length=200)] = None,
    ) -> sc.PayloadOut:
        """Store a firmware image (raw body), content-addressed by SHA-256.

        Uploading an image the tenant already has answers 200 with ``created`` false.
        """
        limit = settings.max_payload_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"payload of {declared} bytes exceeds the limit of {limit} bytes")
        try:
            stored = await store.write_stream(request.stream(), limit)
        except PayloadTooLarge as exc:
            raise ApiError(413, str(exc)) from None
        except EmptyPayload as exc:
            raise ApiError(400, str(exc)) from None

        def record() -> sc.PayloadOut:
            with db.session() as s:
                p, created = images.record_payload(s, t.id, stored.sha256, stored.size, name)
                if not created:
                    response.status_code = 200
                return sc.PayloadOut.of(p, created)

        return await run_in_threadpool(record)

    @api.get("/payloads", response_model=sc.PayloadPage, tags=["payloads"])
    def list_payloads(t: Tenant, limit: sc.Limit = 100, offset: sc.Offset = 0) -> sc.PayloadPage:
        """The tenant's payloads, oldest first."""
        with db.read() as s:
            total, rows = images.list_payloads(s, t.id, limit, offset)
            return sc.PayloadPage.of(total, limit, offset, [sc.PayloadOut.of(p) for p in rows])

    @api.get("/payloads/{sha256}", response_model=sc.PayloadOut, tags=["payloads"])
    def get_payload(sha256: str, t: Tenant) -> sc.PayloadOut:
        with db.read() as s:
            return sc.PayloadOut.of(images.get_payload(s, t.id, payload_sha(sha256)))

    def payload_content(sha256: str, request: Request, t: Tenant) -> Response:
        """The image bytes; supports Range (206/416), ETag and If-None-Match (304)."""
        sha = payload_sha(sha256)
        with db.session() as s:
            images.get_payload(s, t.id, sha)
        if not store.exists(sha):
            raise ApiError(404, f"payload {sha} is recorded but its file is missing")
        return file_response(request.headers, store.path_for(sha), sha, head=request.method == "HEAD")

    @api.delete("/payloads/{sha256}", status_code=204, response_class=Response, tags=["payloads"])
    def delete_payload(sha256: str, t: Tenant) -> Response:
        """Delete a payload; refused (409) while a manifest of the tenant describes it.  The file
        goes once no tenant holds the image."""
        sha = payload_sha(sha256)
        with db.session() as s:
            unheld = images.delete_payload(s, t.id, sha)
        if unheld:
            with db.read() as s:  # an upload of the same image may have come in meanwhile
                unheld = not images.payload_is_published(s, sha)
            if unheld:
                store.remove(sha)
        return Response(status_code=204)

    get_and_head(
        api,
        "/payloads/{sha256}/content",
        payload_content,
        tags=["payloads"],
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, 206: {}, 304: {}, 416: {}},
    )
    return api
