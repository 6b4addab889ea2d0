"""One tenant's campaign cannot stop the engine or ingest for another: policies written straight
into the database (as rows stored before the policy ranges existed, or corrupted) run clamped or
are set aside with a note, while another tenant's campaign completes. Real server, real engine
and ingest, scripted CoAP devices, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import httpx
import pytest
from sqlalchemy import update

from fwcm import manifest as mf
from fwcm.protocol import LwState, Result
from fwcm.rollout import launch
from fwcm.server.metrics import REGISTRY
from fwcm.store import campaigns, tenants
from fwcm.store.models import Campaign

from .conftest import CLASS, VENDOR, Env, firmware
from .test_rollout import ScriptedDevice, until

STORED_BAD = {
    "retries": {"max_attempts": 3, "backoff": "100000000d", "factor": 1e308},
    "device_timeout": "100000000d",
    "rate_per_minute": 1e308,
    "batch_max": 10**28,
}
"""The measured values that once made ingest (year 275817 is out of range) and every engine step
(timestamp out of range) fail; refused at create now, so only a direct write stores them."""
MALFORMED = {"device_timeout": "soon"}
"""A policy no code can read: the engine must set its campaign aside."""


@pytest.fixture
async def coap() -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context()
    yield ctx
    await ctx.shutdown()


def engine_errors() -> float:
    return REGISTRY.get_sample_value("fwcm_engine_campaign_errors_total", {"error": "PolicyError"}) or 0.0


async def _evil_tenant(env: Env) -> tuple[httpx.AsyncClient, int, dict[str, bytes]]:
    """Another tenant with its own signer, manifest and two CoAP devices."""
    with env.server.db.session() as s:
        _t, key = tenants.create_tenant(s, "evil", "Evil")
    http = httpx.AsyncClient(
        base_url=env.settings.public_http_url + "/api/v1",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )

    async def call(method: str, path: str, **kw: Any) -> Any:
        r = await http.request(method, path, **kw)
        assert r.status_code < 400, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    signing = mf.generate_private_key("es256")
    await call(
        "POST", "/signers", json={"name": "rel", "public_key_pem": mf.public_key_pem(signing).decode()}
    )
    image = firmware(1024, seed=9)
    sha = hashlib.sha256(image).hexdigest()
    await call("POST", "/payloads", content=image)
    info = mf.ManifestInfo(
        2, VENDOR, CLASS, bytes.fromhex(sha), len(image), (f"{env.settings.public_http_url}/p/{sha}",)
    )
    man = await call(
        "POST",
        "/manifests",
        content=mf.build_envelope(info, signing),
        headers={"content-type": "application/cbor"},
    )
    rows = ["name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret"]
    rows += [f"{n},{VENDOR},{CLASS},,1,1.0,coap,," for n in ("e1", "e2")]
    out = await call(
        "POST", "/devices/import", content="\n".join(rows) + "\n", headers={"content-type": "text/csv"}
    )
    return http, int(man["id"]), {d["name"]: bytes.fromhex(d["secret"]) for d in out["devices"]}


def _stored_campaign(env: Env, tenant: str, manifest_id: int, device: str, policy: dict[str, Any]) -> int:
    """Create and start a campaign through the store, then overwrite its policy in the same
    transaction: the engine first sees it with ``policy``, validation never did."""
    with env.server.db.session() as s:
        tenant_row = tenants.tenant_by_slug(s, tenant)
        assert tenant_row is not None
        c = campaigns.create_campaign(
            s, tenant_row.id, manifest_id, launch.draft(f"bad {device}", f'name == "{device}"')
        )
        campaigns.start_campaign(s, tenant_row.id, c.id, launch.start_plan)
        s.execute(update(Campaign).where(Campaign.id == c.id).values(policy=policy))
        return c.id


async def test_bad_stored_policies_do_not_stop_another_tenants_campaign(
    env: Env, coap: aiocoap.Context, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="fwcm.server.engine")
    evil, evil_manifest, evil_secrets = await _evil_tenant(env)
    errors_before = engine_errors()
    try:
        clamped = _stored_campaign(env, "evil", evil_manifest, "e1", STORED_BAD)
        broken = _stored_campaign(env, "evil", evil_manifest, "e2", MALFORMED)
        env.server.engine.wake()

        # The clamped campaign runs: its device fails transiently and ingest schedules a retry a
        # year ahead (365 d, the longest backoff) instead of failing the whole batch.
        e1 = ScriptedDevice(coap, env, "e1", evil_secrets["e1"], tenant="evil")
        n = await until(e1.notice)
        await e1.report(n, LwState.DOWNLOADING)
        await e1.report(n, LwState.IDLE, Result.CONNECTION_LOST)

        async def retry_scheduled() -> dict[str, Any] | None:
            r = await evil.get(f"/campaigns/{clamped}/devices")
            [d] = r.json()["items"]
            return d if d["state"] == "pending" and d["result_name"] == "connection_lost" else None

        await until(retry_scheduled)
        events = (await evil.get("/devices/e1/events")).json()["items"]
        assert events[0]["state"] == "failed" and events[0]["detail"].startswith("retry at")

        # Meanwhile another tenant's campaign goes through engine and ingest to the end.
        man = await env.manifest(firmware(1024))
        secrets = await env.devices([("a1", "coap"), ("a2", "coap")])
        cid = await env.campaign(man["id"])
        await env.call("POST", f"/campaigns/{cid}/start")
        for name, secret in sorted(secrets.items()):
            dev = ScriptedDevice(coap, env, name, secret)
            await dev.succeed(await until(dev.notice))

        async def completed() -> dict[str, Any] | None:
            s = await env.call("GET", f"/campaigns/{cid}/stats")
            return s if s["state"] == "completed" else None

        done = await until(completed, timeout=30)
        assert done["counts"]["succeeded"] == 2

        # The unreadable campaign is set aside with a note, retried with backoff, logged once.
        await until(lambda: _errors_at_least(errors_before + 3), timeout=30)
        stats = (await evil.get(f"/campaigns/{broken}/stats")).json()
        assert stats["state"] == "running"
        assert stats["note"].startswith(
            "the engine cannot advance this campaign: PolicyError: device_timeout: must be a duration"
        )
        logged = [r for r in caplog.records if r.getMessage().startswith(f"campaign {broken}: ")]
        assert len(logged) == 1 and logged[0].exc_info is not None
        assert REGISTRY.get_sample_value("fwcm_engine_campaigns_failing") == 1
        assert (await evil.get(f"/campaigns/{clamped}/stats")).json()["note"] is None
        [d] = (await evil.get(f"/campaigns/{clamped}/devices")).json()["items"]
        assert d["state"] == "pending" and d["attempt"] == 1  # its retry waits the clamped year
    finally:
        await evil.aclose()


async def _errors_at_least(n: float) -> bool:
    await asyncio.sleep(0)
    return engine_errors() >= n
