"""The REST management API: a FastAPI app over the tenant-scoped store.

Every ``/api/v1`` route authenticates with ``Authorization: Bearer <key>`` and passes the
tenant to the ``fwcm.store`` modules, which filter every query on it.  Errors are JSON
``{"detail": "..."}`` with one sentence: 400 malformed, 401 no/bad key, 404 absent (or another
tenant's), 409 conflicting state, 413 too large, 422 well-formed but unacceptable, 503 database
unreachable (with ``Retry-After``), 500 anything else (logged once with its traceback).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fwcm import filters, pki
from fwcm.api import schemas as sc
from fwcm.api.ranges import file_response
from fwcm.config import Settings
from fwcm.devices import parse_devices_csv, validate_device
from fwcm.errors import Conflict, ImportErrors, Invalid, NotFound, TooLarge
from fwcm.manifest import ManifestError, SignatureError
from fwcm.rollout import launch
from fwcm.store import campaigns, images, tenants, trust
from fwcm.store import consent as cq
from fwcm.store import devices as device_store
from fwcm.store.db import Database
from fwcm.store.payloads import EmptyPayload, PayloadStore, PayloadTooLarge, is_sha256

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
DB_UNAVAILABLE: tuple[type[Exception], ...] = (OperationalError, InterfaceError, PoolTimeout)
"""What SQLAlchemy raises while the database cannot be reached, refuses connections, or (SQLite)
stays locked past the busy timeout: the request may succeed later."""
RETRY_AFTER_S = 5
OUTAGE_LOG_EVERY_S = 60.0


class Hooks(Protocol):
    def campaign_changed(self, campaign_id: int) -> None: ...

    def devices_changed(self) -> None:
        """Devices were added, removed or renamed: call after any such change is committed (the
        broker accounts follow)."""


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


def _error(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


class UnexpectedErrors:
    """The last resort for errors no handler answered, as JSON like every other error.

    A database outage answers 503 with ``Retry-After`` (one warning a minute while it lasts);
    anything else answers 500 and is logged here once with its traceback. Nothing is re-raised
    for the server to log again, unless the response had already started.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._outage_logged = -OUTAGE_LOG_EVERY_S

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            await self._answer(scope, exc)(scope, receive, send)

    def _answer(self, scope: Scope, exc: Exception) -> JSONResponse:
        where = f"{scope.get('method')} {scope.get('path')}"
        if isinstance(exc, DB_UNAVAILABLE):
            now = time.monotonic()
            if now - self._outage_logged >= OUTAGE_LOG_EVERY_S:
                self._outage_logged = now
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                log.warning("database unavailable (%s): %s", where, first)
            return _error(
                503, "the database is unavailable; retry later", headers={"Retry-After": str(RETRY_AFTER_S)}
            )
        log.error("%s failed", where, exc_info=exc)
        return _error(500, "internal error; the server logged it")


def _install_error_handlers(app: FastAPI) -> None:
    def handler(status: int) -> Any:
        async def h(_request: Request, exc: Exception) -> JSONResponse:
            return _error(status, str(exc))

        return h

    app.add_exception_handler(NotFound, handler(404))
    app.add_exception_handler(Conflict, handler(409))
    app.add_exception_handler(TooLarge, handler(413))
    app.add_exception_handler(filters.FilterError, handler(422))

    async def import_errors(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ImportErrors)
        errors = exc.errors + ([f"... and {exc.more} more"] if exc.more else [])
        return _error(422, str(exc), errors=errors)

    app.add_exception_handler(ImportErrors, import_errors)
    app.add_exception_handler(Invalid, handler(422))

    async def manifest_error(_request: Request, exc: Exception) -> JSONResponse:
        status = 422 if isinstance(exc, SignatureError) else 400
        return _error(status, f"manifest refused: {exc}")

    app.add_exception_handler(ManifestError, manifest_error)

    async def chain_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, pki.ChainError)
        return _error(422, f"certificate chain refused ({exc.reason}): {exc}", reason=exc.reason)

    app.add_exception_handler(pki.ChainError, chain_error)

    async def api_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return _error(exc.status, exc.detail, **exc.extra)

    app.add_exception_handler(ApiError, api_error)

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    app.add_exception_handler(StarletteHTTPException, http_error)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return _error(422, "invalid request: " + "; ".join(parts))

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(UnexpectedErrors)


def current_tenant(request: Request) -> TenantCtx:
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


def fleet_tenant(t: Annotated[TenantCtx, Depends(current_tenant)]) -> TenantCtx:
    """The calling tenant, which must own a fleet: manufacturers only register devices (403)."""
    if t.kind == "manufacturer":
        raise ApiError(403, FLEET_ONLY)
    return t


AnyTenant = Annotated[TenantCtx, Depends(current_tenant)]
Tenant = Annotated[TenantCtx, Depends(fleet_tenant)]
"""Every fleet route takes this: payloads, signers, manifests, devices, campaigns."""


def create_app(db: Database, settings: Settings, hooks: Hooks | None = None) -> FastAPI:
    """The management API plus the public payload route ``/p/{sha256}``."""
    settings.ensure_dirs()
    store = PayloadStore(settings.payload_dir)
    app = FastAPI(
        title="fwcm management API",
        version="1",
        description=(
            "Firmware campaign manager: payloads, signers, SUIT manifests, devices and campaigns of one "
            "tenant. Authenticate with `Authorization: Bearer <api key>`."
        ),
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=f"{PREFIX}/docs",
        redoc_url=None,
    )
    app.state.db = db
    app.state.settings = settings
    app.state.store = store
    _install_error_handlers(app)

    def notify(campaign_id: int) -> None:
        if hooks is not None:
            try:
                hooks.campaign_changed(campaign_id)
            except Exception:  # the change is durable; the engine also polls
                log.exception("campaign_changed hook failed for campaign %d", campaign_id)

    def devices_changed() -> None:
        if hooks is not None:
            try:
                hooks.devices_changed()
            except Exception:  # the change is durable; the accounts are also checked periodically
                log.exception("devices_changed hook failed")

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": sc.ErrorOut} for code in (400, 401, 404, 409, 413, 422)
    }
    api = APIRouter(prefix=PREFIX, responses=errors)

    # -- tenant -------------------------------------------------------------------------------

    @api.get("/tenant", response_model=sc.TenantOut, tags=["tenant"])
    def get_tenant(t: AnyTenant) -> sc.TenantOut:
        with db.read() as s:
            row = tenants.tenant_by_slug(s, t.slug)
            return sc.TenantOut(id=t.id, slug=t.slug, name=t.name, created_at=row.created_at if row else None)

    # -- payloads -----------------------------------------------------------------------------

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

    @api.get("/payloads", response_model=list[sc.PayloadOut], tags=["payloads"])
    def list_payloads(t: Tenant) -> list[sc.PayloadOut]:
        with db.read() as s:
            return [sc.PayloadOut.of(p) for p in images.list_payloads(s, t.id)]

    def _payload_sha(sha256: str) -> str:
        sha = sha256.lower()
        if not is_sha256(sha):
            raise ApiError(404, f"payload {sha256} not found")
        return sha

    @api.get("/payloads/{sha256}", response_model=sc.PayloadOut, tags=["payloads"])
    def get_payload(sha256: str, t: Tenant) -> sc.PayloadOut:
        with db.read() as s:
            return sc.PayloadOut.of(images.get_payload(s, t.id, _payload_sha(sha256)))

    @api.api_route(
        "/payloads/{sha256}/content",
        methods=["GET", "HEAD"],
        tags=["payloads"],
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, 206: {}, 304: {}, 416: {}},
    )
    def payload_content(sha256: str, request: Request, t: Tenant) -> Response:
        """The image bytes; supports Range (206/416), ETag and If-None-Match (304)."""
        sha = _payload_sha(sha256)
        with db.session() as s:
            images.get_payload(s, t.id, sha)
        if not store.exists(sha):
            raise ApiError(404, f"payload {sha} is recorded but its file is missing")
        return file_response(request.headers, store.path_for(sha), sha, head=request.method == "HEAD")

    # -- signers ------------------------------------------------------------------------------

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

    @api.get("/signers", response_model=list[sc.SignerOut], tags=["signers"])
    def list_signers(t: Tenant) -> list[sc.SignerOut]:
        with db.read() as s:
            return [sc.SignerOut.of(x) for x in trust.list_signers(s, t.id)]

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
            notify(cid)
        return out

    # -- manifests ----------------------------------------------------------------------------

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
        data = await _read_body(request, limit, "manifest")

        def store_manifest() -> sc.ManifestOut:
            with db.session() as s:
                m, created = images.upload_manifest(
                    s, t.id, data, max_bytes=limit, name=name, root=settings.root_cert()
                )
                if not created:
                    response.status_code = 200
                return sc.ManifestOut.of(m, trust.signer_name(s, t.id, m.signer_id), created)

        return await run_in_threadpool(store_manifest)

    @api.get("/manifests", response_model=list[sc.ManifestOut], tags=["manifests"])
    def list_manifests(t: Tenant) -> list[sc.ManifestOut]:
        with db.read() as s:
            names = {x.id: x.name for x in trust.list_signers(s, t.id)}
            return [
                sc.ManifestOut.of(m, names.get(m.signer_id) if m.signer_id else None)
                for m in images.list_manifests(s, t.id)
            ]

    @api.get("/manifests/{manifest_id}", response_model=sc.ManifestOut, tags=["manifests"])
    def get_manifest(manifest_id: sc.RowId, t: Tenant) -> sc.ManifestOut:
        with db.read() as s:
            m = images.get_manifest(s, t.id, manifest_id)
            return sc.ManifestOut.of(m, trust.signer_name(s, t.id, m.signer_id))

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

    # -- devices ------------------------------------------------------------------------------

    @api.post("/devices", response_model=sc.DeviceOut, status_code=201, tags=["devices"])
    def add_device(body: sc.DeviceIn, t: Tenant) -> sc.DeviceOut:
        """Register one device; the answer carries its secret (hex) and MQTT credentials once."""
        dev = validate_device(**body.model_dump())
        with db.session() as s:
            out = sc.DeviceOut.of(
                device_store.register_device(s, t.id, dev), secret=dev.secret, tenant=t.slug
            )
        devices_changed()
        return out

    @api.post(
        "/devices/import",
        response_model=sc.ImportOut,
        status_code=201,
        tags=["devices"],
        responses={422: {"model": sc.ImportErrorOut}},
        openapi_extra={
            "requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string"}}}}
        },
    )
    async def import_devices(request: Request, t: Tenant) -> sc.ImportOut:
        """Import devices from CSV, all or nothing.

        Header: ``name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret``
        (name, vendor_id and class_id required; tags as ``k=v;k2=v2``; secret generated when
        empty).  Any bad row refuses the whole file with every problem listed by line number.
        """
        data = await _read_body(request, settings.max_import_bytes, "CSV file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"CSV is not UTF-8 (byte {exc.start})") from None

        def run() -> sc.ImportOut:
            devices = parse_devices_csv(text)
            with db.session() as s:
                device_store.import_devices(s, t.id, devices)
            devices_changed()
            return sc.ImportOut(
                imported=len(devices),
                devices=[sc.ImportedDevice.of(d.name, d.secret, t.slug) for d in devices],
            )

        return await run_in_threadpool(run)

    @api.get("/devices", response_model=sc.DevicePage, tags=["devices"])
    def list_devices(
        t: Tenant,
        filter: Annotated[str, Query(description='Filter expression, e.g. tag.region == "eu"')] = "",
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
        offset: sc.Offset = 0,
    ) -> sc.DevicePage:
        with db.read() as s:
            total, rows = device_store.list_devices(s, t.id, filter, limit, offset)
            return sc.DevicePage(
                total=total, limit=limit, offset=offset, items=[sc.DeviceOut.of(d) for d in rows]
            )

    @api.get("/devices/{name}", response_model=sc.DeviceOut, tags=["devices"])
    def get_device(name: str, t: Tenant) -> sc.DeviceOut:
        with db.read() as s:
            return sc.DeviceOut.of(device_store.get_device(s, t.id, name))

    @api.get("/devices/{name}/events", response_model=list[sc.DeviceEventOut], tags=["devices"])
    def device_events(
        name: str, t: Tenant, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> list[sc.DeviceEventOut]:
        """Recent deployment state changes of one device, newest first."""
        with db.read() as s:
            return [sc.DeviceEventOut.of(e) for e in device_store.device_history(s, t.id, name, limit)]

    # -- campaigns ----------------------------------------------------------------------------

    @api.post("/campaigns", response_model=sc.CampaignOut, status_code=201, tags=["campaigns"])
    def create_campaign(body: sc.CampaignIn, t: Tenant) -> sc.CampaignOut:
        """A draft campaign: a manifest, a device filter (checked now) and a rollout policy."""
        draft = launch.draft(
            body.name,
            body.filter,
            body.policy,
            attestation=body.attestation,
            consent=body.consent,
            requester=t.name,
        )
        with db.session() as s:
            c = campaigns.create_campaign(s, t.id, body.manifest_id, draft)
            return sc.CampaignOut.of(c)

    @api.get("/campaigns/{campaign_id}/accounting", response_model=sc.AccountingOut, tags=["campaigns"])
    def campaign_accounting(campaign_id: sc.RowId, t: Tenant) -> sc.AccountingOut:
        """Usage reported by the installed software of a campaign, per device."""
        with db.read() as s:
            campaigns.get_campaign(s, t.id, campaign_id)
            rows = [sc.AccountingRow(**r) for r in cq.accounting_report(s, t.id, campaign_id)]
        return sc.AccountingOut(
            campaign=campaign_id,
            devices=rows,
            total_uses=sum(r.uses for r in rows),
            reporting=len(rows),
            removed=sum(1 for r in rows if r.removed),
        )

    @api.get("/campaigns", response_model=list[sc.CampaignOut], tags=["campaigns"])
    def list_campaigns(t: Tenant, state: str | None = None) -> list[sc.CampaignOut]:
        with db.read() as s:
            return [sc.CampaignOut.of(c) for c in campaigns.list_campaigns(s, t.id, state)]

    @api.get("/campaigns/{campaign_id}", response_model=sc.CampaignOut, tags=["campaigns"])
    def get_campaign(campaign_id: sc.RowId, t: Tenant) -> sc.CampaignOut:
        with db.read() as s:
            return sc.CampaignOut.of(campaigns.get_campaign(s, t.id, campaign_id))

    @api.post("/campaigns/{campaign_id}/start", response_model=sc.CampaignOut, tags=["campaigns"])
    def start_campaign(campaign_id: sc.RowId, t: Tenant) -> sc.CampaignOut:
        """Freeze the devices matching the filter and start the rollout."""
        with db.session() as s:
            out = sc.CampaignOut.of(campaigns.start_campaign(s, t.id, campaign_id, launch.start_plan))
        notify(campaign_id)
        return out

    def _change(action: str) -> Any:
        def change(campaign_id: sc.RowId, t: Tenant) -> sc.CampaignOut:
            with db.session() as s:
                out = sc.CampaignOut.of(campaigns.change_campaign(s, t.id, campaign_id, action))
            notify(campaign_id)
            return out

        change.__name__ = f"{action}_campaign"
        change.__doc__ = {
            "pause": "Stop sending new notices; devices already updating finish.",
            "resume": "Continue a paused campaign.",
            "cancel": "Withdraw the update from devices that have not started installing.",
        }[action]
        return change

    for action in ("pause", "resume", "cancel"):
        api.add_api_route(
            f"/campaigns/{{campaign_id}}/{action}",
            _change(action),
            methods=["POST"],
            response_model=sc.CampaignOut,
            tags=["campaigns"],
        )

    @api.get("/campaigns/{campaign_id}/stats", response_model=sc.CampaignStats, tags=["campaigns"])
    def campaign_stats(campaign_id: sc.RowId, t: Tenant) -> sc.CampaignStats:
        with db.read() as s:
            return sc.CampaignStats(**campaigns.campaign_stats(s, t.id, campaign_id, launch.phase_names))

    @api.get("/campaigns/{campaign_id}/devices", response_model=sc.DeploymentPage, tags=["campaigns"])
    def campaign_devices(
        campaign_id: sc.RowId,
        t: Tenant,
        state: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
        offset: sc.Offset = 0,
    ) -> sc.DeploymentPage:
        with db.session() as s:
            total, rows = campaigns.campaign_devices(s, t.id, campaign_id, state, limit, offset)
            return sc.DeploymentPage(
                total=total, limit=limit, offset=offset, items=[sc.DeploymentOut(**r) for r in rows]
            )

    @api.get("/campaigns/{campaign_id}/events", response_model=list[sc.CampaignEventOut], tags=["campaigns"])
    def campaign_events(campaign_id: sc.RowId, t: Tenant) -> list[sc.CampaignEventOut]:
        """Every state change of the campaign with its time and reason."""
        with db.read() as s:
            return [sc.CampaignEventOut.of(e) for e in campaigns.campaign_events(s, t.id, campaign_id)]

    from fwcm.api.inventory import create_router as inventory_router  # imports this module

    app.include_router(
        inventory_router(db, settings, devices_changed)
    )  # first: /devices/outdated before /devices/{name}
    from fwcm.api.deadletters import create_router as dead_letters_router  # imports this module

    app.include_router(dead_letters_router(db))
    app.include_router(api)

    # -- public payload route for devices --------------------------------------------------------

    published: set[str] = set()

    @app.api_route(
        "/p/{sha256}",
        methods=["GET", "HEAD"],
        tags=["devices"],
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, 206: {}, 304: {}, 404: {}, 416: {}},
    )
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

    return app


async def _read_body(request: Request, limit: int, what: str) -> bytes:
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
