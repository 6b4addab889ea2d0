"""The audit trail: one ``fwcm.store.audit`` entry per mutating API request made with a valid key.

An ASGI middleware, outside every other layer so it sees the status actually sent (errors
included).  ``current_tenant`` leaves the caller in the scope; once the answer's status is known
the entry is written in a short transaction of its own, before the answer goes out, so a client
that got its answer finds the entry.  A failed write is counted and logged; the request is
answered as if nothing happened.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fwcm import roles
from fwcm.api.deps import CALLER, TenantCtx
from fwcm.server.metrics import AUDIT_FAILURES
from fwcm.store import audit
from fwcm.store.db import Database

log = logging.getLogger(__name__)

MAX_PARAM = 200
"""Characters kept of one path parameter."""


def entry(scope: Scope, caller: TenantCtx, status: int) -> audit.Entry:
    """What the audit log keeps of one request."""
    route = getattr(scope.get("route"), "path", None) or str(scope.get("path", ""))[:200]
    params: dict[str, Any] = scope.get("path_params") or {}
    client = scope.get("client")
    return audit.Entry(
        tenant_id=caller.id,
        key_name=caller.key_name,
        role=caller.role.label,
        method=str(scope.get("method", "")),
        route=route,
        status=status,
        source=str(client[0]) if client else "unknown",
        object={str(k)[:64]: str(v)[:MAX_PARAM] for k, v in list(params.items())[:8]},
    )


class AuditTrail:
    def __init__(self, app: ASGIApp, db: Database) -> None:
        self.app = app
        self.db = db

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not roles.is_mutation(scope.get("method", "GET")):
            await self.app(scope, receive, send)
            return

        async def audited(message: Message) -> None:
            if message["type"] == "http.response.start":
                caller = scope.get(CALLER)
                if isinstance(caller, TenantCtx):
                    await self._record(entry(scope, caller, int(message["status"])))
            await send(message)

        await self.app(scope, receive, audited)

    async def _record(self, e: audit.Entry) -> None:
        try:
            await run_in_threadpool(self._write, e)
        except Exception as exc:
            AUDIT_FAILURES.inc()
            log.error("audit entry for %s %s (key %s) not written: %s", e.method, e.route, e.key_name, exc)

    def _write(self, e: audit.Entry) -> None:
        with self.db.session() as s:
            audit.record(s, e)
