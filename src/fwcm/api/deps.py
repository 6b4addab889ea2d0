"""What every API router shares: the calling tenant, API errors, bounded bodies and change hooks.

Every ``/api/v1`` route authenticates with ``Authorization: Bearer <key>`` (``current_tenant``),
which also checks that the key's role allows the request's method on its route (``fwcm.roles``,
403 naming the role needed); ``Tenant`` further requires a fleet tenant and ``Maker`` a
manufacturer (403 otherwise).  A route
refuses a request by raising ``ApiError`` (or a ``fwcm.errors`` type), which ``create_app`` turns
into JSON ``{"detail": ...}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fwcm import roles
from fwcm.api import schemas as sc
from fwcm.server.metrics import AUTH_FAILURES
from fwcm.store import tenants
from fwcm.store.db import Database, utcnow

log = logging.getLogger(__name__)

PREFIX = "/api/v1"


class Hooks(Protocol):
    def campaign_changed(self, campaign_id: int) -> None: ...

    def devices_changed(self) -> None:
        """Devices were added, removed or renamed: call after any such change is committed (the
        broker accounts follow)."""

    def devices_withdrawn(self, tenant: str, names: list[str]) -> None:
        """Devices were decommissioned or deleted (committed): their notices, cached keys and
        broker accounts go."""


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

    def devices_withdrawn(self, tenant: str, names: list[str]) -> None:
        if self.hooks is not None:
            try:
                self.hooks.devices_withdrawn(tenant, names)
            except Exception:
                log.exception("devices_withdrawn hook failed for %d devices of %s", len(names), tenant)


@dataclass(frozen=True)
class TenantCtx:
    id: int
    slug: str
    name: str
    kind: str = "fleet"
    """``fleet`` or ``manufacturer``: a manufacturer only registers devices for others to claim."""
    key_name: str = tenants.INITIAL_KEY
    role: roles.Role = roles.Role.ADMIN


class ApiError(Exception):
    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.extra = extra


CALLER = "fwcm.caller"
"""Where ``current_tenant`` leaves the authenticated caller in the ASGI scope, for the audit log."""
CHALLENGE = {"WWW-Authenticate": "Bearer"}
REFUSED_KEY = {
    "expired": "API key expired",
    "revoked": "API key revoked",
}


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _refuse_key(request: Request, reason: str, found: tenants.KeyCheck | None) -> HTTPException:
    """Count and log a refused key (the log is rate-limited by template, see ``fwcm.logs``)."""
    AUTH_FAILURES.labels(reason).inc()
    if found is None:
        log.warning("API key refused (unknown) from %s", client_address(request))
    else:
        log.warning(
            "API key refused (%s): key %s of tenant %s from %s",
            reason,
            found.key.name,
            found.tenant.slug,
            client_address(request),
        )
    return HTTPException(401, REFUSED_KEY.get(reason, "invalid API key"), CHALLENGE)


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
    """Resolve ``Authorization: Bearer <key>`` to the calling tenant, or answer 401; answer 403
    when the key's role does not allow this method on this route."""
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(401, "missing API key: send Authorization: Bearer <key>", CHALLENGE)
    db: Database = request.app.state.db
    now = utcnow()
    with db.read() as s:
        found = tenants.check_key(s, key.strip(), now)
        if found is None:
            raise _refuse_key(request, "unknown", None)
        if found.refused is not None:
            raise _refuse_key(request, found.refused, found)
        t, k = found.tenant, found.key
        ctx = TenantCtx(t.id, t.slug, t.name, t.kind, k.name, roles.Role.parse(k.role))
        key_id, stale = k.id, tenants.needs_touch(k, now)
    if stale:
        _touch(db, key_id, now)
    request.scope[CALLER] = ctx
    route = getattr(request.scope.get("route"), "path", request.url.path)
    refused = roles.refusal(ctx.role, roles.required_role(request.method, route), request.method, route)
    if refused is not None:
        raise ApiError(403, refused, role_needed=roles.required_role(request.method, route).label)
    return ctx


def _touch(db: Database, key_id: int, now: datetime) -> None:
    """Record the key's use; a failure (a locked database) only loses this one timestamp."""
    try:
        with db.session() as s:
            tenants.touch_key(s, key_id, now)
    except Exception as exc:
        log.warning("could not record the use of an API key: %s", exc)


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
