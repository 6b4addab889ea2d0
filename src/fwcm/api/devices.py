"""The device-facing API: what a device itself calls over HTTP, without an API key.

Today that is the payload fetch ``GET /p/{sha256}`` (Range, ETag, HEAD): the manifest's signature
and digest protect the bytes, so only payloads some manifest publishes are served, to anyone.
Everything an operator calls lives in ``fwcm.api.management``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from fwcm.api.deps import ApiError, get_and_head
from fwcm.api.ranges import file_response
from fwcm.store import images
from fwcm.store.db import Database
from fwcm.store.payloads import PayloadStore, is_sha256


def create_router(db: Database, store: PayloadStore) -> APIRouter:
    api = APIRouter()
    published: set[str] = set()

    def device_payload(sha256: str, request: Request) -> Response:
        """Firmware by digest, no credentials: the manifest's signature and digest protect it."""
        sha = sha256.lower()
        if not is_sha256(sha) or not store.exists(sha):
            raise ApiError(404, f"payload {sha256} not found")
        if sha not in published:  # a published payload stays published: remember it
            with db.read() as s:
                if not images.payload_is_published(s, sha):
                    raise ApiError(404, f"payload {sha256} not found")
            published.add(sha)
        return file_response(request.headers, store.path_for(sha), sha, head=request.method == "HEAD")

    get_and_head(
        api,
        "/p/{sha256}",
        device_payload,
        tags=["devices"],
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, 206: {}, 304: {}, 404: {}, 416: {}},
    )
    return api
