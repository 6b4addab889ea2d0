"""The HTTP API: one FastAPI app over the tenant-scoped store, serving the management API
(``fwcm.api.management``, ``/api/v1``) and the device-facing routes (``fwcm.api.devices``).

Every ``/api/v1`` route authenticates with ``Authorization: Bearer <key>`` and passes the
tenant to the ``fwcm.store`` modules, which filter every query on it.  Errors are JSON
``{"detail": "..."}`` with one sentence: 400 malformed, 401 no/bad key, 404 absent (or another
tenant's), 409 conflicting state, 413 too large, 422 well-formed but unacceptable, 503 database
unreachable (with ``Retry-After``), 500 anything else (logged once with its traceback).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fwcm import filters, pki
from fwcm.api import devices, management
from fwcm.api.audit_trail import AuditTrail
from fwcm.api.deps import PREFIX, ApiError, Hooks, Notify
from fwcm.config import Settings
from fwcm.errors import Conflict, ImportErrors, Invalid, NotFound, TooLarge
from fwcm.manifest import ManifestError, SignatureError
from fwcm.store.db import Database
from fwcm.store.payloads import PayloadStore

log = logging.getLogger(__name__)

DB_UNAVAILABLE: tuple[type[Exception], ...] = (OperationalError, InterfaceError, PoolTimeout)
"""What SQLAlchemy raises while the database cannot be reached, refuses connections, or (SQLite)
stays locked past the busy timeout: the request may succeed later."""
RETRY_AFTER_S = 5
OUTAGE_LOG_EVERY_S = 60.0


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


def create_app(db: Database, settings: Settings, hooks: Hooks | None = None) -> FastAPI:
    """The management API (``/api/v1``) plus the device-facing payload route ``/p/{sha256}``."""
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
    app.add_middleware(AuditTrail, db=db)  # outside UnexpectedErrors: it sees every status sent
    for router in management.routers(db, settings, store, Notify(hooks)):
        app.include_router(router)
    app.include_router(devices.create_router(db, store))
    return app
