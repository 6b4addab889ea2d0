"""The console's pages: what each one reads (through the store modules the API uses) and renders.

Every page needs a signed-in session (``session.Sessions``) and reads only its tenant's objects:
another tenant's campaign or device answers 404 like an absent one.  Actions are POST forms with
the session's CSRF token; they call what the API's routes call and wake the engine the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from fwcm import filters
from fwcm.api import schemas as sc
from fwcm.api.deps import Notify
from fwcm.console import charts
from fwcm.console.session import Sessions, Viewer, csrf_ok
from fwcm.errors import Conflict, Invalid, NotFound
from fwcm.protocol import Result
from fwcm.rollout import launch, planner
from fwcm.rollout.policy import Policy, PolicyError
from fwcm.store import campaigns, images, progress, tenants
from fwcm.store import console as cq
from fwcm.store import devices as device_store
from fwcm.store.db import Database, utcnow

log = logging.getLogger(__name__)

PAGE = 100
LIVE_EVERY_S = 2.0
"""A live page checks its campaign's fingerprint this often and re-renders only on a change."""
LIVE_CPU_BUDGET = 0.015
"""The share of one core a campaign's live renders may take, whatever the number of its pages."""
RECHECK_SESSION_S = 30.0
HEARTBEAT_S = 15.0
ACTIONS = {
    "pause": "Pause: stop sending new notices; devices already updating finish.",
    "resume": "Resume: continue the rollout.",
    "approve": "Approve: start the next phase.",
    "cancel": "Cancel: withdraw the update from devices that have not started installing.",
}
ACTIONABLE = {
    "pause": {"running", "scheduled"},
    "resume": {"paused", "stopped"},
    "approve": {"paused"},
    "cancel": {"running", "paused", "scheduled", "stopped"},
}


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("fwcm.console", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["duration"] = _duration
    env.filters["result"] = _result
    env.globals["urlencode"] = urlencode
    return env


def _when(t: datetime | None) -> str:
    if t is None:
        return "—"
    t = t if t.tzinfo else t.replace(tzinfo=UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _result(code: int) -> str:
    """A result code as its name, as the API's ``result_name`` reads (``update_failed (8)``)."""
    try:
        return f"{Result(code).name.lower()} ({code})"
    except ValueError:
        return str(code)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class HtmlErrors(APIRoute):
    """Answers the store's refusals as pages: 404 for what is absent or another tenant's, 409 for
    an action the campaign's state does not allow, 422 for unacceptable input."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except (NotFound, Conflict, Invalid) as exc:
                status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 422
                page = request.app.state.console_env.get_template("error.html")
                viewer = request.scope.get("fwcm.console.viewer")
                html = page.render(status=status, message=str(exc), viewer=viewer)
                return HTMLResponse(html, status_code=status)

        return handle


def _policy(stored: dict[str, Any]) -> Policy | None:
    try:
        return Policy.from_stored(stored or {})
    except PolicyError:
        return None


def campaign_live(s: Session, tenant_id: int, campaign_id: int) -> dict[str, Any]:
    """Everything the live part of a campaign page shows: the API's stats (counts, pace, ETA and
    why it waits) and what is drawn from them, plus the failure breakdowns (one GROUP BY over the
    failed devices), completions per minute and the newest events."""
    c = campaigns.get_campaign(s, tenant_id, campaign_id)
    stats = progress.campaign_stats(s, tenant_id, campaign_id, launch.phase_names, launch.pace)
    failed = charts.FAILED
    chart = None
    if c.started_at is not None:
        started = c.started_at if c.started_at.tzinfo else c.started_at.replace(tzinfo=UTC)
        end = c.finished_at or utcnow()
        end = end if end.tzinfo else end.replace(tzinfo=UTC)
        bucket = charts.bucket_size((end - started).total_seconds())
        rows = cq.completions_over_time(s, tenant_id, campaign_id, failed | charts.GOOD, started, bucket)
        chart = charts.completions_chart(rows, started.timestamp(), end.timestamp(), bucket)
    by = cq.failures_by(s, tenant_id, campaign_id, failed)
    return {
        "campaign": c,
        "stats": stats,
        "bar": charts.stacked_bar(stats["counts"]),
        "gauges": charts.phase_gauges(_policy(c.policy), stats["phases"], c.phase),
        "by_class": by["class_id"],
        "by_hardware": by["hardware_id"],
        "by_version": by["version"],
        "chart": chart,
        "events": cq.last_events(s, tenant_id, campaign_id),
        "waiting_approval": _waiting_approval(stats),
    }


def _waiting_approval(stats: dict[str, Any]) -> bool:
    return stats["state"] == "paused" and "waiting for approval" in (stats["eta_note"] or "")


@dataclass
class _Fragment:
    checked: float
    rendered: float
    render_s: float
    fingerprint: tuple[Any, ...]
    version: int
    html: str


class LiveCache:
    """The newest live fragment of each watched campaign, shared by every page open on it.

    The fingerprint (two index lookups) is read at most once per ``every_s`` per campaign, and
    the fragment rendered again only when it changed, and no sooner than ``render_s / budget``
    after the last render: the counts are kept (``store.counts``), but the failures and the pace
    still read the failed and recently finished devices, so a large campaign's pages update every
    second or two rather than cost the server a share of a core per change
    (``docs/console.md`` has the figures).
    """

    def __init__(
        self,
        db: Database,
        render: Callable[[int, int], str],
        every_s: float = LIVE_EVERY_S,
        budget: float = LIVE_CPU_BUDGET,
    ) -> None:
        self.db = db
        self.render = render
        self.every_s = every_s
        self.budget = budget
        self._entries: dict[int, _Fragment] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    async def latest(self, tenant_id: int, campaign_id: int) -> tuple[int, str]:
        """(version, html) of the campaign's fragment, fresh within ``every_s`` (or the budget)."""
        lock = self._locks.setdefault(campaign_id, asyncio.Lock())
        async with lock:
            now = time.monotonic()
            e = self._entries.get(campaign_id)
            if e is not None and (
                now - e.checked < self.every_s * 0.9 or now - e.rendered < e.render_s / self.budget
            ):
                return e.version, e.html
            fp = await run_in_threadpool(self._fingerprint, tenant_id, campaign_id)
            if e is not None and e.fingerprint == fp:
                e.checked = now
                return e.version, e.html
            t0 = time.monotonic()
            html = await run_in_threadpool(self.render, tenant_id, campaign_id)
            done = time.monotonic()
            version = e.version + 1 if e is not None else 1
            self._entries[campaign_id] = _Fragment(now, done, done - t0, fp, version, html)
            return version, html

    def _fingerprint(self, tenant_id: int, campaign_id: int) -> tuple[Any, ...]:
        with self.db.read() as s:
            return cq.fingerprint(s, tenant_id, campaign_id)

    def forget(self, campaign_id: int) -> None:
        self._entries.pop(campaign_id, None)


MAX_FORM_BYTES = 4096
"""The console's forms carry a key, a token and a flag: anything longer is refused."""


async def form_fields(request: Request) -> dict[str, str]:
    """The fields of a URL-encoded form (the first value of each), bounded in size."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return {}
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
    return {k: v[0] for k, v in fields.items() if v}


def _sse(event: str, html: str) -> str:
    data = "\n".join(f"data: {line}" for line in html.splitlines() or [""])
    return f"event: {event}\n{data}\n\n"


def create_router(db: Database, sessions: Sessions, env: Environment, notify: Notify) -> APIRouter:
    api = APIRouter(prefix="/ui", include_in_schema=False, route_class=HtmlErrors)

    def page(name: str, viewer: Viewer | None, code: int = 200, **ctx: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(viewer=viewer, **ctx), status_code=code)

    def refuse(viewer: Viewer | None, code: int, message: str) -> HTMLResponse:
        return page("error.html", viewer, code, status=code, message=message)

    def signed_in(request: Request) -> Viewer | None:
        viewer = sessions.current(request)
        request.scope["fwcm.console.viewer"] = viewer
        return viewer

    def to_signin() -> RedirectResponse:
        return RedirectResponse("/ui/signin", status_code=303)

    def render_live(tenant_id: int, campaign_id: int) -> str:
        with db.read() as s:
            return env.get_template("_live.html").render(**campaign_live(s, tenant_id, campaign_id))

    live = LiveCache(db, render_live)

    @api.get("")
    def home(request: Request) -> Response:
        return RedirectResponse("/ui/campaigns", status_code=303)

    @api.get("/signin")
    def signin_form(request: Request) -> Response:
        return signin_page(request, None, 200)

    @api.post("/signin")
    async def signin(request: Request) -> Response:
        fields = await form_fields(request)
        return await run_in_threadpool(signin_with, request, fields.get("key", ""), fields.get("csrf", ""))

    def signin_with(request: Request, key: str, csrf: str) -> Response:
        if not sessions.signin_ok(request, csrf):
            return signin_page(request, "the sign-in form expired; try again", 400)
        with db.read() as s:
            found = tenants.check_key(s, key.strip()[:300])
            usable = found is not None and found.refused is None and found.tenant.kind != "manufacturer"
            key_id = found.key.id if found is not None else 0
        if not usable:
            log.warning("console sign-in refused from %s", request.client.host if request.client else "?")
            return signin_page(request, "that key is not a usable fleet API key", 401)
        response = RedirectResponse("/ui/campaigns", status_code=303)
        sessions.start(response, request, key_id)
        sessions.identify(request, key_id)  # the audit log records the sign-in as the key's
        return response

    def signin_page(request: Request, error: str | None, code: int) -> Response:
        nonce, signed = sessions.signin_token()
        body = env.get_template("signin.html").render(viewer=None, token=nonce, error=error)
        response = HTMLResponse(body, status_code=code)
        sessions.bind_signin(response, request, signed)
        return response

    @api.post("/signout")
    async def signout(request: Request) -> Response:
        csrf = (await form_fields(request)).get("csrf", "")
        viewer = await run_in_threadpool(signed_in, request)
        if viewer is not None and not csrf_ok(viewer, csrf):
            return refuse(viewer, 403, "missing or wrong CSRF token")
        response = RedirectResponse("/ui/signin", status_code=303)
        sessions.end(response)
        return response

    @api.get("/campaigns")
    def campaign_list(request: Request, offset: sc.Offset = 0) -> Response:
        viewer = signed_in(request)
        if viewer is None:
            return to_signin()
        offset = max(0, offset)
        with db.read() as s:
            total, rows = campaigns.list_campaigns(s, viewer.tenant.id, None, PAGE, offset)
            items = [
                {
                    "c": c,
                    "stats": progress.campaign_stats(
                        s, viewer.tenant.id, c.id, launch.phase_names, launch.pace
                    )
                    if c.state in ("running", "paused", "scheduled", "stopped")
                    else None,
                }
                for c in rows
            ]
            return page("campaigns.html", viewer, items=items, total=total, offset=offset, page_size=PAGE)

    @api.get("/campaigns/{campaign_id}")
    def campaign_page(request: Request, campaign_id: sc.RowId) -> Response:
        viewer = signed_in(request)
        if viewer is None:
            return to_signin()
        with db.read() as s:
            data = campaign_live(s, viewer.tenant.id, campaign_id)
            c = data["campaign"]
            manifest = images.get_manifest(s, viewer.tenant.id, c.manifest_id)
            signer = cq.signer_of(s, viewer.tenant.id, manifest.signer_id)
            return page(
                "campaign.html",
                viewer,
                manifest=manifest,
                signer=signer,
                actions=_actions(c.state, data["waiting_approval"]),
                action_help=ACTIONS,
                **data,
            )

    @api.get("/campaigns/{campaign_id}/live")
    async def campaign_stream(request: Request, campaign_id: sc.RowId) -> Response:
        viewer = signed_in(request)
        if viewer is None:
            return Response("sign in first", status_code=401)
        tenant_id = viewer.tenant.id
        await live.latest(tenant_id, campaign_id)  # 404 before the stream starts

        async def stream() -> AsyncIterator[str]:
            sent = 0
            checked = heartbeat = time.monotonic()
            yield "retry: 2000\n\n"
            while not await request.is_disconnected():
                now = time.monotonic()
                try:
                    if now - checked >= RECHECK_SESSION_S:
                        checked = now
                        if await run_in_threadpool(sessions.current, request) is None:
                            yield _sse("signedout", "")
                            return
                    version, html = await live.latest(tenant_id, campaign_id)
                except NotFound:
                    return
                except Exception as exc:  # the database went away: the browser reconnects later
                    log.warning(
                        "live page of campaign %d ended: %s",
                        campaign_id,
                        (str(exc).splitlines() or [type(exc).__name__])[0],
                    )
                    return
                if version != sent:  # the first time too: the page may be older than the stream
                    sent = version
                    heartbeat = now
                    yield _sse("stats", html)
                elif now - heartbeat >= HEARTBEAT_S:
                    heartbeat = now
                    yield ": still here\n\n"
                await asyncio.sleep(live.every_s)

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @api.post("/campaigns/{campaign_id}/{action}")
    async def campaign_action(request: Request, campaign_id: sc.RowId, action: str) -> Response:
        fields = await form_fields(request)
        csrf, confirmed = fields.get("csrf", ""), fields.get("confirmed", "")
        return await run_in_threadpool(act, request, campaign_id, action, csrf, confirmed)

    def act(request: Request, campaign_id: int, action: str, csrf: str, confirmed: str) -> Response:
        viewer = signed_in(request)
        if viewer is None:
            return to_signin()
        if not csrf_ok(viewer, csrf):
            return refuse(viewer, 403, "missing or wrong CSRF token")
        if action not in ACTIONS:
            raise NotFound(f"no action {action!r}")
        if not viewer.can_act:
            message = f"{action} needs the operator role; this key has the {viewer.tenant.role.label} role"
            return refuse(viewer, 403, message)
        with db.session() as s:
            c = campaigns.get_campaign(s, viewer.tenant.id, campaign_id)
            if confirmed != "yes":  # without JavaScript's confirm(): a page that asks
                return page("confirm.html", viewer, c=c, action=action, help=ACTIONS[action])
            _act(s, viewer, campaign_id, action)
        notify.campaign_changed(campaign_id)
        live.forget(campaign_id)
        return RedirectResponse(f"/ui/campaigns/{campaign_id}", status_code=303)

    @api.get("/campaigns/{campaign_id}/devices")
    def campaign_devices(
        request: Request,
        campaign_id: sc.RowId,
        state: Annotated[str, Query(max_length=200)] = "",
        result: Annotated[int | None, Query(ge=0, le=255)] = None,
        attr: str = "",
        value: str | None = None,
        offset: sc.Offset = 0,
    ) -> Response:
        viewer = signed_in(request)
        if viewer is None:
            return to_signin()
        states = [x for x in state.split(",") if x] or None
        where = {attr: value or None} if attr in ("class_id", "version", "hardware_id") else None
        with db.read() as s:
            c = campaigns.get_campaign(s, viewer.tenant.id, campaign_id)
            total, rows = cq.deployments(
                s, viewer.tenant.id, campaign_id, states=states, result=result, where=where,
                limit=PAGE, offset=max(0, offset),
            )  # fmt: skip
            query = {
                "state": state,
                "result": "" if result is None else result,
                "attr": attr,
                "value": value or "",
            }
            return page(
                "campaign_devices.html", viewer, c=c, rows=rows, total=total, offset=offset, query=query,
                page_size=PAGE,
            )  # fmt: skip

    @api.get("/devices")
    def device_list(request: Request, filter: str = "", offset: sc.Offset = 0) -> Response:
        viewer = signed_in(request)
        if viewer is None:
            return to_signin()
        error = None
        total, rows = 0, []
        with db.read() as s:
            try:
                total, found = device_store.list_devices(s, viewer.tenant.id, filter, PAGE, max(0, offset))
                rows = list(found)
            except filters.FilterError as exc:
                error = exc
            status = 422 if error is not None else 200
            return page(
                "devices.html", viewer, status, rows=rows, total=total, filter=filter, error=error,
                offset=offset, page_size=PAGE,
            )  # fmt: skip

    @api.get("/devices/{name}")
    def device_page(request: Request, name: str) -> Response:
        viewer = signed_in(request)
        if viewer is None:
            return to_signin()
        with db.read() as s:
            device = device_store.get_device(s, viewer.tenant.id, name)
            deployments = cq.device_deployments(s, viewer.tenant.id, device.id)
            _n, history = device_store.device_history(s, viewer.tenant.id, name, 50, 0)
            return page("device.html", viewer, d=device, deployments=deployments, history=history)

    @api.get("/manifests")
    def manifest_list(request: Request, offset: sc.Offset = 0) -> Response:
        viewer = signed_in(request)
        if viewer is None:
            return to_signin()
        with db.read() as s:
            total, rows = images.list_manifests(s, viewer.tenant.id, PAGE, max(0, offset))
            signers = {m.signer_id: cq.signer_of(s, viewer.tenant.id, m.signer_id) for m in rows}
            return page("manifests.html", viewer, rows=rows, signers=signers, total=total, offset=offset)

    @api.get("/payloads")
    def payload_list(request: Request, offset: sc.Offset = 0) -> Response:
        viewer = signed_in(request)
        if viewer is None:
            return to_signin()
        with db.read() as s:
            total, rows = images.list_payloads(s, viewer.tenant.id, PAGE, max(0, offset))
            return page("payloads.html", viewer, rows=rows, total=total, offset=offset)

    return api


def _actions(state: str, waiting_approval: bool) -> list[str]:
    """The actions a campaign in ``state`` offers; approve replaces resume at an approval gate."""
    out = [a for a, states in ACTIONABLE.items() if state in states]
    if waiting_approval:
        out.remove("resume")
    else:
        out = [a for a in out if a != "approve"]
    return out


def _act(s: Session, viewer: Viewer, campaign_id: int, action: str) -> None:
    """What ``POST /api/v1/campaigns/{id}/<action>`` does; approve is a resume at an approval gate
    (the audit log tells them apart by the route's action)."""
    tid = viewer.tenant.id
    if action == "approve":
        stats = progress.campaign_stats(s, tid, campaign_id, launch.phase_names, launch.pace)
        if not _waiting_approval(stats):
            raise Conflict(f"campaign {campaign_id} is not waiting for approval")
        action = "resume"
    campaigns.change_campaign(s, tid, campaign_id, action, review=planner.review)
