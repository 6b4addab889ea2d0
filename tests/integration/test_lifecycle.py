"""Day-two operations over real HTTP (uvicorn on loopback), on SQLite and PostgreSQL: device
update, retag, decommission and delete; payload, manifest and campaign delete refused while in
use; campaign clone, retry of failed devices, resume of a stopped campaign; all tenant-scoped."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from test_api import device_json, envelope

from fwcm import manifest
from fwcm.rollout import deployment
from fwcm.rollout.deployment import DeploymentView
from fwcm.rollout.states import CampaignState, DeviceState
from fwcm.store import deployments as dq
from fwcm.store import device_state as ds
from fwcm.store import leases as lq
from fwcm.store import tenants
from fwcm.store.models import Deployment, Device

V1 = "/api/v1"


@pytest.fixture
def base_url(live_api: str) -> str:
    return live_api


def _client(base_url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=base_url + V1, headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.fixture
def acme(api: Any, base_url: str) -> Iterator[httpx.Client]:
    with _client(base_url, api.key) as c:
        yield c


@pytest.fixture
def globex(api: Any, base_url: str) -> Iterator[httpx.Client]:
    with api.db.session() as s:
        _t, key = tenants.create_tenant(s, "globex", "Globex")
    with _client(base_url, key) as c:
        yield c


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json() if r.content else None


def refused(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return str(r.json()["detail"])


def _manifest(c: httpx.Client, image: bytes = b"firmware image") -> tuple[str, int]:
    sha = ok(c.post("/payloads", content=image), 201)["sha256"]
    key = manifest.generate_private_key("es256")
    pem = manifest.public_key_pem(key).decode()
    ok(c.post("/signers", json={"name": f"release-{sha[:8]}", "public_key_pem": pem}), 201)
    r = c.post("/manifests", content=envelope(key, image), headers={"content-type": "application/cbor"})
    return sha, int(ok(r, 201)["id"])


def _campaign(c: httpx.Client, manifest_id: int, name: str = "c", filter_: str = "", **kw: Any) -> int:
    body = {"name": name, "manifest_id": manifest_id, "filter": filter_, **kw}
    return int(ok(c.post("/campaigns", json=body), 201)["id"])


def _devices(c: httpx.Client, *names: str, **tags: str) -> None:
    for n in names:
        ok(c.post("/devices", json=device_json(n, tags=dict(tags))), 201)


# -- devices ------------------------------------------------------------------------------------


def test_update_changes_tags_and_attributes(acme: httpx.Client, globex: httpx.Client) -> None:
    _devices(acme, "d1", region="eu", ring="canary")
    d = ok(acme.patch("/devices/d1", json={"tags": {"ring": None, "floor": 3}, "version": "2.0"}))
    assert d["tags"] == {"region": "eu", "floor": "3"} and d["version"] == "2.0"
    d = ok(acme.patch("/devices/d1", json={"version": None, "hardware_id": "hw-1"}))
    assert (d["version"], d["hardware_id"], d["tags"]["region"]) == (None, "hw-1", "eu")
    assert "not valid" in refused(acme.patch("/devices/d1", json={"tags": {"bad key": "x"}}), 422)
    refused(acme.patch("/devices/d1", json={"secret": "00"}), 422)
    assert refused(globex.patch("/devices/d1", json={"tags": {"x": "1"}}), 404) == "device 'd1' not found"
    assert ok(acme.get("/devices/d1"))["tags"] == {"region": "eu", "floor": "3"}


def test_retag_changes_every_device_the_filter_selects(acme: httpx.Client, globex: httpx.Client) -> None:
    _devices(acme, "eu-1", "eu-2", region="eu")
    _devices(acme, "us-1", region="us")
    _devices(globex, "eu-1", region="eu")
    out = ok(acme.post("/devices/retag", json={"filter": 'tag.region == "eu"', "tags": {"ring": "canary"}}))
    assert out == {"matched": 2}
    page = ok(acme.get("/devices", params={"filter": 'tag.ring == "canary"'}))
    assert [d["name"] for d in page["items"]] == ["eu-1", "eu-2"]
    assert ok(globex.get("/devices/eu-1"))["tags"] == {"region": "eu"}  # another tenant's: untouched
    out = ok(acme.post("/devices/retag", json={"filter": "", "tags": {"ring": None, "fleet": "a"}}))
    assert out == {"matched": 3}
    assert ok(acme.get("/devices/eu-2"))["tags"] == {"region": "eu", "fleet": "a"}
    refused(acme.post("/devices/retag", json={"filter": "tag.region ==", "tags": {"a": "b"}}), 422)


def test_decommission_withdraws_deployments_and_keeps_the_device_out(api: Any, acme: httpx.Client) -> None:
    _devices(acme, "old", "kept")
    _sha, mid = _manifest(acme)
    cid = _campaign(acme, mid)
    assert ok(acme.post(f"/campaigns/{cid}/start"))["total"] == 2
    with api.db.session() as s:  # the engine notifies them
        assert len(dq.take_pending(s, cid, 10)) == 2

    out = ok(acme.post("/devices/old/decommission"))
    assert out["withdrawn"] == 1 and out["device"]["decommissioned_at"] is not None
    assert ok(acme.post("/devices/old/decommission"))["withdrawn"] == 0  # again: nothing more
    states = {d["device"]: d for d in ok(acme.get(f"/campaigns/{cid}/devices"))["items"]}
    assert (states["old"]["state"], states["old"]["detail"]) == ("cancelled", "device decommissioned")
    assert states["kept"]["state"] == "notified"
    events = ok(acme.get("/devices/old/events"))["items"]
    assert (events[0]["campaign_id"], events[0]["state"]) == (cid, "cancelled")
    with api.db.read() as s:
        keys = ds.device_keys(s, [("acme", "old"), ("acme", "kept")])
    assert keys[("acme", "old")].retired and not keys[("acme", "kept")].retired

    # a new campaign over every device leaves it out
    assert ok(acme.post(f"/campaigns/{_campaign(acme, mid, 'next')}/start"))["total"] == 1


def test_delete_needs_a_decommissioned_device_or_force(
    api: Any, acme: httpx.Client, globex: httpx.Client
) -> None:
    _devices(acme, "a", "b")
    detail = refused(acme.delete("/devices/a"), 409)
    assert "in service" in detail and "decommission" in detail
    assert refused(globex.delete("/devices/a"), 404) == "device 'a' not found"
    assert refused(globex.post("/devices/a/decommission"), 404) == "device 'a' not found"
    ok(acme.post("/devices/a/decommission"))
    assert acme.delete("/devices/a").status_code == 204
    refused(acme.get("/devices/a"), 404)
    assert acme.delete("/devices/b", params={"force": "true"}).status_code == 204
    assert ok(acme.get("/devices"))["total"] == 0
    with api.db.read() as s:
        assert s.scalar(select(Device.id).where(Device.tenant_id == api.tenant_id)) is None


# -- payloads, manifests, campaigns -----------------------------------------------------------------


def test_deletes_are_refused_while_something_uses_the_object(
    api: Any, acme: httpx.Client, globex: httpx.Client
) -> None:
    image = b"image in use"
    sha, mid = _manifest(acme, image)
    cid = _campaign(acme, mid)
    assert refused(acme.delete(f"/payloads/{sha}"), 409) == (
        f"payload {sha} is used by manifest {mid}; delete those first"
    )
    assert refused(acme.delete(f"/manifests/{mid}"), 409) == (
        f"manifest {mid} is used by campaign {cid}; delete those first"
    )
    assert refused(globex.delete(f"/campaigns/{cid}"), 404) == f"campaign {cid} not found"
    assert refused(globex.delete(f"/manifests/{mid}"), 404) == f"manifest {mid} not found"
    assert refused(globex.delete(f"/payloads/{sha}"), 404) == f"payload {sha} not found"

    assert acme.delete(f"/campaigns/{cid}").status_code == 204  # a draft
    assert acme.delete(f"/manifests/{mid}").status_code == 204
    assert acme.delete(f"/payloads/{sha}").status_code == 204
    refused(acme.get(f"/payloads/{sha}"), 404)
    assert not api.settings.payload_dir.joinpath(sha[:2], sha[2:]).exists()


def test_a_payload_another_tenant_holds_keeps_its_file(
    api: Any, acme: httpx.Client, globex: httpx.Client
) -> None:
    image = b"shared image"
    sha = hashlib.sha256(image).hexdigest()
    ok(acme.post("/payloads", content=image), 201)
    ok(globex.post("/payloads", content=image), 201)
    assert acme.delete(f"/payloads/{sha}").status_code == 204
    assert globex.get(f"/payloads/{sha}/content").content == image


def test_a_live_campaign_cannot_be_deleted(api: Any, acme: httpx.Client) -> None:
    _devices(acme, "d")
    _sha, mid = _manifest(acme)
    cid = _campaign(acme, mid)
    ok(acme.post(f"/campaigns/{cid}/start"))
    assert refused(acme.delete(f"/campaigns/{cid}"), 409) == (
        f"campaign {cid} is running; only a draft or an ended campaign can be deleted (cancel it first)"
    )
    ok(acme.post(f"/campaigns/{cid}/cancel"))
    assert "still withdrawing" in refused(acme.delete(f"/campaigns/{cid}"), 409)
    with api.db.session() as s:  # the engine withdrew the notices
        lq.settle_cancel(s, cid)
    assert acme.delete(f"/campaigns/{cid}").status_code == 204
    refused(acme.get(f"/campaigns/{cid}"), 404)
    assert ok(acme.get("/devices/d"))["name"] == "d"


def test_clone_makes_a_new_draft(acme: httpx.Client, globex: httpx.Client) -> None:
    _sha, mid = _manifest(acme)
    policy = {"phases": [{"size": 1, "advance": "approval"}, {"until": "100%"}]}
    cid = _campaign(acme, mid, "spring", 'tag.region == "eu"', policy=policy)
    c = ok(acme.post(f"/campaigns/{cid}/clone"), 201)
    assert (c["name"], c["state"], c["manifest_id"], c["filter"]) == (
        "spring (copy)",
        "draft",
        mid,
        'tag.region == "eu"',
    )
    assert c["policy"] == ok(acme.get(f"/campaigns/{cid}"))["policy"] and c["id"] != cid
    assert ok(acme.post(f"/campaigns/{cid}/clone", json={"name": "summer"}), 201)["name"] == "summer"
    refused(acme.post(f"/campaigns/{cid}/clone", json={"name": ""}), 422)
    assert refused(globex.post(f"/campaigns/{cid}/clone"), 404) == f"campaign {cid} not found"


def _end_with_failures(api: Any, cid: int, state: CampaignState) -> None:
    """What the engine and two devices did: notified all, one failed, one timed out, the rest
    succeeded, then the campaign ended in ``state``."""
    with api.db.session() as s:
        targets = dq.take_pending(s, cid, 10)
        ids = sorted(t.device_pk for t in targets)
        s.execute(update(Deployment).where(Deployment.device_id == ids[0]).values(state="failed", result=8))
        s.execute(update(Deployment).where(Deployment.device_id == ids[1]).values(state="timed_out"))
        s.execute(update(Deployment).where(Deployment.device_id.in_(ids[2:])).values(state="succeeded"))
        lq.set_campaign_state(s, cid, api.tenant_id, state, "error threshold crossed")


def test_retry_gives_failed_devices_a_new_attempt(api: Any, acme: httpx.Client, globex: httpx.Client) -> None:
    _devices(acme, "d1", "d2", "d3")
    _sha, mid = _manifest(acme)
    cid = _campaign(acme, mid)
    assert "retry needs a campaign that is" in refused(acme.post(f"/campaigns/{cid}/retry"), 409)
    ok(acme.post(f"/campaigns/{cid}/start"))
    _end_with_failures(api, cid, CampaignState.COMPLETED)
    assert refused(globex.post(f"/campaigns/{cid}/retry"), 404) == f"campaign {cid} not found"

    out = ok(acme.post(f"/campaigns/{cid}/retry"))
    assert out["retried"] == 2
    assert (out["campaign"]["state"], out["campaign"]["finished_at"]) == ("running", None)
    counts = ok(acme.get(f"/campaigns/{cid}/stats"))["counts"]
    assert (counts["pending"], counts["succeeded"], counts["failed"], counts["timed_out"]) == (2, 1, 0, 0)
    assert "no failed or timed-out devices" in refused(acme.post(f"/campaigns/{cid}/retry"), 409)
    with api.db.session() as s:
        again = dq.take_pending(s, cid, 10)
        assert sorted(t.attempt for t in again) == [2, 2]
        rows = s.execute(select(Deployment.state, Deployment.attempt).where(Deployment.campaign_id == cid))
        view = {r.attempt for r in rows if r.state == DeviceState.NOTIFIED.value}
    assert view == {2}
    events = ok(acme.get(f"/campaigns/{cid}/events"))["items"]
    assert events[-1]["reason"] == "retry: 2 failed and timed-out devices get a new attempt"


def test_a_report_of_the_old_attempt_is_ignored_after_a_retry() -> None:
    """The rule the retry relies on: the attempt number went up, the old attempt's report is stale."""
    from fwcm.protocol import LwState, Report, Result

    old = Report(device="d", campaign=1, attempt=1, seq=9, state=LwState.IDLE, result=Result.SUCCESS)
    assert deployment.apply_report(DeploymentView(DeviceState.NOTIFIED, 2, -1), old) is None


def test_resume_a_stopped_campaign_after_review(api: Any, acme: httpx.Client) -> None:
    _devices(acme, "d1", "d2", "d3")
    _sha, mid = _manifest(acme)
    cid = _campaign(acme, mid)
    ok(acme.post(f"/campaigns/{cid}/start"))
    _end_with_failures(api, cid, CampaignState.STOPPED)
    c = ok(acme.post(f"/campaigns/{cid}/resume"))
    assert (c["state"], c["finished_at"], c["stop_reason"]) == ("running", None, None)
    with api.db.session() as s:
        held = lq.lease_campaigns(s, "test", 30)
    assert [h.reviewed for h in held if h.id == cid] == [{"errors": {"0": 2}, "success": [0]}]
    ok(acme.post(f"/campaigns/{cid}/cancel"))
    assert "resume needs a campaign that is paused or stopped" in refused(
        acme.post(f"/campaigns/{cid}/resume"), 409
    )


@pytest.mark.parametrize("action", ["pause", "cancel"])
def test_a_plan_made_before_an_operator_change_is_not_written(
    api: Any, acme: httpx.Client, action: str
) -> None:
    """The engine leased a running campaign, then the operator paused or cancelled it before the
    engine wrote its plan: the plan (notify every device) is dropped, the operator's state stays."""
    import time

    from fwcm.rollout import planner
    from fwcm.rollout.policy import Policy
    from fwcm.server import engine

    _devices(acme, "d1", "d2", "d3")
    _sha, mid = _manifest(acme)
    cid = _campaign(acme, mid)
    ok(acme.post(f"/campaigns/{cid}/start"))
    with api.db.session() as s:
        [stale] = [c for c in lq.lease_campaigns(s, "test", 30) if c.id == cid]
        policy = Policy.from_stored(stale.policy)
        step = planner.plan(policy, engine._snapshot(s, stale, {}, None), planner.PolicyState(), time.time())
    assert step.decision.notify == 3
    ok(acme.post(f"/campaigns/{cid}/{action}"))
    with api.db.session() as s:
        assert engine._apply(s, stale, policy, step, time.time()) is None
    stats = ok(acme.get(f"/campaigns/{cid}/stats"))
    assert stats["state"] == {"pause": "paused", "cancel": "cancelled"}[action]
    assert stats["counts"]["notified"] == 0
    with api.db.session() as s:  # a lease read now is current again (a cancelled one is not leased)
        fresh = [c for c in lq.lease_campaigns(s, "test", 30) if c.id == cid]
        assert [lq.unchanged_since_lease(s, c) for c in fresh] == ([True] if action == "pause" else [])
