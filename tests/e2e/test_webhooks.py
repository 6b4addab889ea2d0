"""Webhooks against a real server and real receivers: a tenant registers a local HTTP receiver,
runs a phased campaign that stops on its error threshold, and receives the signed events in
order (the first delivery refused once, then retried); another tenant's receiver gets nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import httpx
import pytest
import uvicorn

from fwcm import webhooks as rules
from fwcm.protocol import LwState, Notice, Result
from fwcm.store import tenants
from fwcm.transport.broker import free_port

from .conftest import Env, firmware
from .test_rollout import ScriptedDevice, until


@dataclass
class Receiver:
    """Records every request; answers 500 to the first ``refuse`` of them, then 204."""

    refuse: int = 0
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.got.append((headers, body))
        status = 500 if len(self.got) <= self.refuse else 204
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def events(self) -> list[dict[str, Any]]:
        """The distinct events received, in the order they first arrived."""
        seen: dict[str, dict[str, Any]] = {}
        for _h, body in self.got:
            doc = json.loads(body)
            seen.setdefault(doc["id"], doc)
        return list(seen.values())


@asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[Receiver]:
    port = free_port()
    config = uvicorn.Config(receiver, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "receiver did not start"
        await asyncio.sleep(0.02)
    receiver.url = f"http://127.0.0.1:{port}/hooks/fwcm"
    try:
        yield receiver
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def coap() -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context()
    yield ctx
    await ctx.shutdown()


async def _notice(dev: ScriptedDevice) -> Notice | None:
    return await dev.notice()


async def test_signed_events_arrive_in_order_with_a_retry_and_only_for_their_tenant(
    env: Env, coap: aiocoap.Context
) -> None:
    env.server.webhooks.retry_s = 1.0  # the first retry a second after the refusal
    env.server.webhooks.batch_s = 0.5
    with env.server.db.session() as s:
        _t, other_key = tenants.create_tenant(s, "other", "Other")
    other = httpx.AsyncClient(
        base_url=env.settings.public_http_url + "/api/v1",
        headers={"Authorization": f"Bearer {other_key}"},
        timeout=30,
    )
    async with receiving(Receiver(refuse=1)) as mine, receiving(Receiver()) as theirs:
        hook = await env.call("POST", "/webhooks", json={"url": mine.url})
        assert len(hook["secret"]) == 64 and hook["events"] is None
        r = await other.post("/webhooks", json={"url": theirs.url})
        assert r.status_code == 201
        other_hook = r.json()
        # each tenant sees only its own webhooks and logs
        listed = await env.call("GET", "/webhooks")
        assert [h["id"] for h in listed["items"]] == [hook["id"]] and "secret" not in listed["items"][0]
        assert (await other.get(f"/webhooks/{hook['id']}/deliveries")).status_code == 404
        assert (await other.delete(f"/webhooks/{hook['id']}")).status_code == 404

        man = await env.manifest(firmware(1024))
        secrets = await env.devices([(f"w{i}", "coap") for i in range(3)])
        devs = [ScriptedDevice(coap, env, n, sec) for n, sec in sorted(secrets.items())]
        policy = {"on_error": "stop", "phases": [{"size": 1}, {"error_threshold": "50%"}]}
        cid = await env.campaign(man["id"], policy=policy)
        await env.call("POST", f"/campaigns/{cid}/start")

        async def first_notified() -> tuple[ScriptedDevice, Notice] | None:
            for d in devs:
                n = await d.notice()
                if n is not None:
                    return d, n
            return None

        canary, n = await until(first_notified)
        await canary.succeed(n)
        rest = [d for d in devs if d is not canary]
        failing = rest[0]
        n2 = await until(lambda: _notice(failing))
        await failing.report(n2, LwState.IDLE, Result.INTEGRITY_FAILURE)

        async def stopped() -> bool:
            c = await env.call("GET", f"/campaigns/{cid}")
            return bool(c["state"] == "stopped")

        await until(stopped)
        want = [
            rules.CAMPAIGN_STATE,
            rules.CAMPAIGN_STATE,
            rules.PHASE_ADVANCED,
            rules.DEVICE_FAILED,
            rules.THRESHOLD_STOPPED,
        ]
        await until(lambda: _received(mine, len(want)), timeout=60)
        events = mine.events()
        assert [e["type"] for e in events] == want
        assert [e["data"].get("state") for e in events[:2]] == ["draft", "running"]
        assert events[2]["data"]["phase"].startswith("phase 2")
        failed = events[3]["data"]
        assert failed["campaign"]["id"] == cid and failed["count"] == 1
        assert failed["devices"][0]["name"] == failing.name
        assert failed["devices"][0]["state"] == "failed"
        assert "error threshold" in events[4]["data"]["reason"]
        assert all(e["tenant"] == "acme" for e in events)

        # every request is signed over its timestamp and exact body; the refused one came again
        for headers, body in mine.got:
            stamp = int(headers[rules.TIMESTAMP_HEADER.lower()])
            assert rules.verify(hook["secret"], stamp, body, headers[rules.SIGNATURE_HEADER.lower()])
            doc = json.loads(body)
            assert headers[rules.ID_HEADER.lower()] == doc["id"]
            assert headers[rules.EVENT_HEADER.lower()] == doc["type"]
        assert json.loads(mine.got[0][1])["id"] == json.loads(mine.got[1][1])["id"]
        assert mine.got[0][1] == mine.got[1][1]

        log = await env.call("GET", f"/webhooks/{hook['id']}/deliveries")
        by_id = {d["event_id"]: d for d in log["items"]}
        first = by_id[events[0]["id"]]
        assert first["state"] == "delivered" and first["attempts"] == 2
        assert [t["status"] for t in first["tries"]] == [500, 204]
        assert first["tries"][0]["error"] == "HTTP 500"
        assert all(d["state"] == "delivered" for d in log["items"])

        # the other tenant's receiver got nothing of acme's campaign, and its log is empty
        assert theirs.got == []
        r = await other.get(f"/webhooks/{other_hook['id']}/deliveries")
        assert r.status_code == 200 and r.json()["items"] == []

        # removed: nothing more is sent
        r = await env.http.delete(f"/api/v1/webhooks/{hook['id']}")
        assert r.status_code == 204
        assert (await env.call("GET", "/webhooks"))["items"] == []
    await other.aclose()


async def _received(receiver: Receiver, n: int) -> bool:
    return len(receiver.events()) >= n


async def test_bad_webhook_urls_are_refused_with_422(env: Env) -> None:
    for url, why in [
        ("ftp://127.0.0.1/x", "only http and https"),
        ("http://user:pw@127.0.0.1/", "credentials"),
        ("http://" + "a" * 2100, "url"),
    ]:
        r = await env.http.post("/api/v1/webhooks", json={"url": url})
        assert r.status_code == 422, r.text
        assert why in json.dumps(r.json()["detail"])
    r = await env.http.post("/api/v1/webhooks", json={"url": "http://127.0.0.1/", "events": ["nope"]})
    assert r.status_code == 422 and "unknown nope" in r.json()["detail"]
    for _ in range(rules.PER_TENANT):
        assert (
            await env.http.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/"})
        ).status_code == 201
    r = await env.http.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/"})
    assert r.status_code == 409 and "at most" in r.json()["detail"]
