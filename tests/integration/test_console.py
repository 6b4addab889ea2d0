"""The operator console over the real app on SQLite and PostgreSQL, without a browser: sign-in,
sessions and CSRF, the tenant boundary, roles, actions in the history and the audit log, the
filter error display and the live stream's first fragment."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from fwcm.console import mount, views
from fwcm.errors import NotFound
from fwcm.store import tenants
from fwcm.store.models import AuditEntry, Campaign, CampaignEvent, Deployment
from tests.integration.test_api import add_signer, device_json, envelope, upload_manifest


@pytest.fixture
def console(api: Any) -> Any:
    mount(api.app, api.db, api.settings)  # type: ignore[arg-type]
    return api


def browser(api: Any) -> TestClient:
    """A client without the API key header, following no redirects: a browser's view."""
    c = TestClient(api.app, follow_redirects=False)
    api._clients.append(c)
    return c


def sign_in(c: TestClient, key: str) -> str:
    """Sign in and return the session's CSRF token (read from a page, as a form would)."""
    form = c.get("/ui/signin")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token is not None
    r = c.post("/ui/signin", data={"key": key, "csrf": token.group(1)})
    assert r.status_code == 303 and r.headers["location"] == "/ui/campaigns", r.text
    page = c.get("/ui/campaigns")
    assert page.status_code == 200
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


def running_campaign(api: Any, devices: int = 3) -> int:
    key = add_signer(api.client)
    assert upload_manifest(api.client, envelope(key)).status_code == 201
    for i in range(devices):
        assert api.client.post("/api/v1/devices", json=device_json(f"dev-{i}")).status_code == 201
    r = api.client.post("/api/v1/campaigns", json={"name": "spring", "manifest_id": 1, "filter": ""})
    assert r.status_code == 201, r.text
    cid = int(r.json()["id"])
    assert api.client.post(f"/api/v1/campaigns/{cid}/start").status_code == 200
    return cid


def test_root_redirects_and_pages_need_a_session(console: Any) -> None:
    c = browser(console)
    assert c.get("/").headers["location"] == "/ui"
    r = c.get("/ui/campaigns")
    assert r.status_code == 303 and r.headers["location"] == "/ui/signin"
    assert c.get("/ui/campaigns/1/live").status_code == 401


def test_sign_in_cookie_flags_and_sign_out(console: Any) -> None:
    c = browser(console)
    assert c.get("/ui/static/console.css").status_code == 200
    form = c.get("/ui/signin")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token is not None
    refused = c.post("/ui/signin", data={"key": "fwcm_wrong", "csrf": token.group(1)})
    assert refused.status_code == 401 and "not a usable fleet API key" in refused.text
    token = re.search(r'name="csrf" value="([^"]+)"', refused.text)
    assert token is not None
    forged = TestClient(console.app, follow_redirects=False)  # no sign-in cookie: another site's form
    assert forged.post("/ui/signin", data={"key": console.key, "csrf": token.group(1)}).status_code == 400
    forged.close()
    r = c.post("/ui/signin", data={"key": console.key, "csrf": token.group(1)})
    assert r.status_code == 303
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("fwcm_console="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert console.key not in cookie
    page = c.get("/ui/campaigns")
    assert page.status_code == 200 and "Acme Corp" in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    assert c.post("/ui/signout", data={"csrf": "wrong"}).status_code == 403
    out = c.post("/ui/signout", data={"csrf": csrf.group(1)})
    assert out.status_code == 303
    c.cookies.clear()
    assert c.get("/ui/campaigns").status_code == 303


def test_revoked_key_ends_its_session(console: Any) -> None:
    with console.db.session() as s:
        _row, key = tenants.create_key(s, console.tenant_id, "ops", "operator")
    c = browser(console)
    sign_in(c, key)
    with console.db.session() as s:
        tenants.revoke_key(s, console.tenant_id, "ops")
    assert c.get("/ui/campaigns").status_code == 303


def test_campaign_page_actions_history_and_audit(console: Any) -> None:
    cid = running_campaign(console)
    c = browser(console)
    csrf = sign_in(c, console.key)
    page = c.get(f"/ui/campaigns/{cid}")
    assert page.status_code == 200
    assert "spring" in page.text and 'id="action-pause"' in page.text and "pending 3" in page.text
    assert c.post(f"/ui/campaigns/{cid}/pause", data={"confirmed": "yes"}).status_code == 403  # no CSRF
    ask = c.post(f"/ui/campaigns/{cid}/pause", data={"csrf": csrf})
    assert ask.status_code == 200 and "Yes, pause" in ask.text  # confirmation without JavaScript
    assert console.client.get(f"/api/v1/campaigns/{cid}").json()["state"] == "running"
    done = c.post(f"/ui/campaigns/{cid}/pause", data={"csrf": csrf, "confirmed": "yes"})
    assert done.status_code == 303
    assert console.client.get(f"/api/v1/campaigns/{cid}").json()["state"] == "paused"
    again = c.post(f"/ui/campaigns/{cid}/pause", data={"csrf": csrf, "confirmed": "yes"})
    assert again.status_code == 409
    assert c.post(f"/ui/campaigns/{cid}/approve", data={"csrf": csrf, "confirmed": "yes"}).status_code == 409
    assert c.post(f"/ui/campaigns/{cid}/resume", data={"csrf": csrf, "confirmed": "yes"}).status_code == 303
    assert console.client.get(f"/api/v1/campaigns/{cid}").json()["state"] == "running"
    with console.db.read() as s:
        states = list(s.scalars(select(CampaignEvent.state).where(CampaignEvent.campaign_id == cid)))
        audited = s.execute(
            select(AuditEntry.route, AuditEntry.status, AuditEntry.object, AuditEntry.key_name)
            .where(AuditEntry.route.like("/ui/%"))
            .order_by(AuditEntry.id)
        ).all()
    assert states[-2:] == ["paused", "running"]
    actions = [(a.object.get("action"), a.status) for a in audited if a.route.startswith("/ui/campaigns")]
    assert ("pause", 303) in actions and ("resume", 303) in actions and ("pause", 409) in actions
    assert all(a.key_name == tenants.INITIAL_KEY for a in audited)
    assert any(a.route == "/ui/signin" for a in audited)
    history = c.get(f"/ui/campaigns/{cid}").text
    assert "pause requested" in history and "resume requested" in history


def test_viewer_reads_but_cannot_act(console: Any) -> None:
    cid = running_campaign(console)
    with console.db.session() as s:
        _row, key = tenants.create_key(s, console.tenant_id, "watcher", "viewer")
    c = browser(console)
    csrf = sign_in(c, key)
    page = c.get(f"/ui/campaigns/{cid}")
    assert page.status_code == 200 and 'id="action-pause"' not in page.text
    r = c.post(f"/ui/campaigns/{cid}/pause", data={"csrf": csrf, "confirmed": "yes"})
    assert r.status_code == 403 and "operator role" in r.text
    assert console.client.get(f"/api/v1/campaigns/{cid}").json()["state"] == "running"


def test_another_tenants_objects_answer_404(console: Any) -> None:
    cid = running_campaign(console)
    other = console.new_tenant("globex")
    key = other.headers["Authorization"].removeprefix("Bearer ")
    c = browser(console)
    csrf = sign_in(c, key)
    for path in (f"/ui/campaigns/{cid}", f"/ui/campaigns/{cid}/devices", "/ui/devices/dev-0"):
        r = c.get(path)
        assert r.status_code == 404, path
        assert "not found" in r.text and "spring" not in r.text and "region" not in r.text
    assert c.get(f"/ui/campaigns/{cid}/live").status_code == 404
    r = c.post(f"/ui/campaigns/{cid}/pause", data={"csrf": csrf, "confirmed": "yes"})
    assert r.status_code == 404
    assert console.client.get(f"/api/v1/campaigns/{cid}").json()["state"] == "running"
    assert "dev-0" not in c.get("/ui/devices").text


def test_device_list_filter_error_names_its_column(console: Any) -> None:
    running_campaign(console)
    c = browser(console)
    sign_in(c, console.key)
    ok = c.get("/ui/devices", params={"filter": 'name == "dev-1"'})
    assert ok.status_code == 200 and "1 device match" in ok.text
    bad = c.get("/ui/devices", params={"filter": 'name == "dev-1" and bogus == 1'})
    assert bad.status_code == 422
    assert "invalid filter at column 21" in bad.text and 'aria-invalid="true"' in bad.text
    device = c.get("/ui/devices/dev-1")
    assert device.status_code == 200 and "spring" in device.text
    assert "Manifests" in c.get("/ui/manifests").text and c.get("/ui/payloads").status_code == 200


async def test_live_fragment_renders_again_only_on_a_change(console: Any) -> None:
    cid = running_campaign(console)
    rendered: list[int] = []

    def render(tenant_id: int, campaign_id: int) -> str:
        rendered.append(campaign_id)
        with console.db.read() as s:
            return (
                views.environment()
                .get_template("_live.html")
                .render(**views.campaign_live(s, tenant_id, campaign_id))
            )

    live = views.LiveCache(console.db, render, every_s=0.0, budget=1e9)
    first, html = await live.latest(console.tenant_id, cid)
    assert 'id="campaign-state">running' in html and "pending 3" in html
    assert (await live.latest(console.tenant_id, cid))[0] == first
    assert (await live.latest(console.tenant_id, cid))[0] == first
    assert rendered == [cid]  # the fingerprint did not change: nothing rendered again
    assert console.client.post(f"/api/v1/campaigns/{cid}/pause").status_code == 200
    version, html = await live.latest(console.tenant_id, cid)
    assert version == first + 1 and 'id="campaign-state">paused' in html
    assert rendered == [cid, cid]
    with pytest.raises(NotFound):
        await live.latest(console.tenant_id + 1, cid)

    thrifty = views.LiveCache(console.db, render, every_s=0.0, budget=1e-9)  # a render is never cheap enough
    before, _html = await thrifty.latest(console.tenant_id, cid)
    assert console.client.post(f"/api/v1/campaigns/{cid}/resume").status_code == 200
    assert (await thrifty.latest(console.tenant_id, cid))[0] == before  # held back by the budget


def test_approve_resumes_at_an_approval_gate_only(console: Any) -> None:
    key = add_signer(console.client)
    assert upload_manifest(console.client, envelope(key)).status_code == 201
    for i in range(3):
        assert console.client.post("/api/v1/devices", json=device_json(f"dev-{i}")).status_code == 201
    policy = {"phases": [{"name": "canary", "size": 1, "advance": "approval"}, {"name": "rest"}]}
    body = {"name": "gated", "manifest_id": 1, "filter": "", "policy": policy}
    cid = int(console.client.post("/api/v1/campaigns", json=body).json()["id"])
    assert console.client.post(f"/api/v1/campaigns/{cid}/start").status_code == 200
    c = browser(console)
    csrf = sign_in(c, console.key)
    assert 'id="action-approve"' not in c.get(f"/ui/campaigns/{cid}").text
    with console.db.session() as s:  # what the planner does when the canary is done: the gate
        s.execute(
            update(Deployment)
            .where(Deployment.campaign_id == cid, Deployment.phase == 0)
            .values(state="succeeded")
        )
        s.execute(update(Campaign).where(Campaign.id == cid).values(state="paused", phase=1))
    page = c.get(f"/ui/campaigns/{cid}").text
    assert "waiting for approval of phase 2 (rest)" in page
    assert 'id="action-approve"' in page and 'id="action-resume"' not in page
    assert c.post(f"/ui/campaigns/{cid}/approve", data={"csrf": csrf, "confirmed": "yes"}).status_code == 303
    assert console.client.get(f"/api/v1/campaigns/{cid}").json()["state"] == "running"
    with console.db.read() as s:
        routes = s.execute(select(AuditEntry.object).where(AuditEntry.route.like("/ui/campaigns/%"))).all()
    assert [r.object["action"] for r in routes] == ["approve"]


def test_bad_input_gets_a_clear_refusal(console: Any) -> None:
    c = browser(console)
    csrf = sign_in(c, console.key)
    for path in ("/ui/campaigns/99999999999999999999", "/ui/campaigns?offset=-1", "/ui/devices?offset=1e99"):
        assert c.get(path).status_code == 422, path
    assert c.get("/ui/campaigns/1/devices?result=999").status_code == 422
    assert c.get("/ui/campaigns/424242").status_code == 404
    huge = {"csrf": csrf, "confirmed": "yes", "pad": "x" * 10_000}
    assert c.post("/ui/campaigns/1/pause", data=huge).status_code == 403  # the form is not read
    assert c.post("/ui/signin", content=b"key=x", headers={"content-type": "text/plain"}).status_code == 400
    assert c.get("/ui/campaigns").status_code == 200  # the session still works
