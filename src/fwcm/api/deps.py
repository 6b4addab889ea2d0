"""What every API router shares: the calling tenant, API errors, bounded bodies and change hooks.

Every ``/api/v1`` route authenticates with ``Authorization: Bearer <key>`` (``current_tenant``);
``Tenant`` further requires a fleet tenant and ``Maker`` a manufacturer (403 otherwise).  A route
refuses a request by raising ``ApiError`` (or a ``fwcm.errors`` type), which ``create_app`` turns
into JSON ``{"detail": ...}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fwcm.api import schemas as sc
from fwcm.store import tenants
from fwcm.store.db import Database

log = logging.getLogger(__name__)

PREFIX = "/api/v1"


class Hooks(Protocol):
    def campaign_changed(self, campaign_id: int) -> None: ...

    def devices_changed(self) -> None:
        """Devices were added, removed or renamed: call after any such change is committed (the
        broker accounts follow)."""


class Notify:
    """Tells the server (``Hooks``) what a request changed, after it committed.

    A failing hook is logged and otherwise ignored: the change is durable, the engine polls
    campaigns and the broker accounts are also checked periodically.
    """

    def __init__(self, hooks: Hooks | None) -> None:
        self.hooks = hooks

    def campaign_changed(self, campaign_id: int) -> None:
        if self.hooks is not None:
            try:
                self.hooks.campaign_changed(campaign_id)
            except Exception:
                log.exception("campaign_changed hook failed for campaign %d", campaign_id)

    def devices_changed(self) -> None:
        if self.hooks is not None:
            try:
                self.hooks.devices_changed()
            except Exception:
                log.exception("devices_changed hook failed")


@dataclass(frozen=True)
class TenantCtx:
    id: int
    slug: str
    name: str
    kind: str = "fleet"
    """``fleet`` or ``manufacturer``: a manufacturer only registers devices for others to claim."""


class ApiError(Exception):
    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.extra = extra


BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="A tenant's API key (`fwcm admin tenant-create` prints it): `Authorization: Bearer <key>`.",
)
"""Declares the bearer scheme in the OpenAPI document (Swagger's "Authorize" sends the key); the
check itself stays in ``current_tenant``, so a refusal reads the same with or without it."""


def current_tenant(
    request: Request, _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
) -> TenantCtx:
    """Resolve ``Authorization: Bearer <key>`` to the calling tenant, or answer 401."""
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(
            401, "missing API key: send Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"}
        )
    db: Database = request.app.state.db
    with db.session() as s:
        t = tenants.tenant_for_key(s, key.strip())
        if t is None:
            raise HTTPException(401, "invalid API key", {"WWW-Authenticate": "Bearer"})
        return TenantCtx(t.id, t.slug, t.name, t.kind)


FLEET_ONLY = "manufacturer tenants can only use the /factory endpoints; claiming needs a fleet tenant"
MANUFACTURER = "manufacturer"
FACTORY_ONLY = "only manufacturer tenants can register or list factory devices"


def fleet_tenant(t: Annotated[TenantCtx, Depends(current_tenant)]) -> TenantCtx:
    """The calling tenant, which must own a fleet: manufacturers only register devices (403)."""
    if t.kind == MANUFACTURER:
        raise ApiError(403, FLEET_ONLY)
    return t


def manufacturer_tenant(t: Annotated[TenantCtx, Depends(current_tenant)]) -> TenantCtx:
    """The calling tenant, which must be a manufacturer (403 for a fleet tenant)."""
    if t.kind != MANUFACTURER:
        raise ApiError(403, FACTORY_ONLY)
    return t


AnyTenant = Annotated[TenantCtx, Depends(current_tenant)]
Tenant = Annotated[TenantCtx, Depends(fleet_tenant)]
"""Every fleet route takes this: payloads, signers, manifests, devices, campaigns."""
Maker = Annotated[TenantCtx, Depends(manufacturer_tenant)]


def router(*codes: int) -> APIRouter:
    """A router under ``/api/v1`` whose operations document these error answers."""
    errors: dict[int | str, dict[str, Any]] = {code: {"model": sc.ErrorOut} for code in codes}
    return APIRouter(prefix=PREFIX, responses=errors)


MANAGEMENT_ERRORS = (400, 401, 404, 409, 413, 422)
"""The error answers every management route documents."""


def get_and_head(api: APIRouter, path: str, endpoint: Callable[..., Any], **options: Any) -> None:
    """Serve ``endpoint`` for GET and HEAD as two routes, so each has its own OpenAPI operation id."""
    for method in ("GET", "HEAD"):
        api.add_api_route(path, endpoint, methods=[method], **options)


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"{what} of {declared} bytes exceeds the limit of {limit} bytes")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, f"{what} exceeds the limit of {limit} bytes")
    if not buf:
        raise ApiError(400, f"empty {what}")
    return bytes(buf)
