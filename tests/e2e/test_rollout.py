"""Rollout rules carried out by the engine against a real server: retries, timeouts, pause and
resume, dynamic membership, scheduled start and maintenance windows.

Devices here are scripted CoAP clients speaking the wire protocol directly, so each test decides
exactly what a device reports and when."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from rich.console import Console

from fwcm import protocol
from fwcm.cli import watch
from fwcm.protocol import LwState, Notice, Report, Result

from .conftest import Env, firmware


class ScriptedDevice:
    """A device whose every message the test writes by hand."""

    def __init__(
        self, ctx: aiocoap.Context, env: Env, name: str, secret: bytes, tenant: str = "acme"
    ) -> None:
        self.ctx, self.env, self.name, self.secret, self.tenant = ctx, env, name, secret, tenant
        self.seq: dict[tuple[int, int], int] = {}

    async def notice(self) -> Notice | None:
        k = protocol.device_password(self.secret, self.tenant, self.name)
        uri = f"{self.env.settings.public_coap_url}/n/{self.tenant}/{self.name}?k={k}"
        resp = await asyncio.wait_for(self.ctx.request(aiocoap.Message(code=Code.GET, uri=uri)).response, 10)
        assert resp.code == Code.CONTENT, resp
        return protocol.decode_notice(resp.payload, self.secret) if resp.payload else None

    async def report(self, n: Notice, state: LwState, result: Result = Result.INITIAL) -> None:
        key = (n.campaign, n.attempt)
        self.seq[key] = self.seq.get(key, -1) + 1
        r = Report(
            self.name,
            n.campaign,
            n.attempt,
            self.seq[key],
            state,
            result,
            installed_sequence=2 if result == Result.SUCCESS else None,
        )
        uri = f"{self.env.settings.public_coap_url}/s/{self.tenant}/{self.name}"
        msg = aiocoap.Message(code=Code.POST, uri=uri, payload=protocol.encode_report(self.secret, r))
        resp = await asyncio.wait_for(self.ctx.request(msg).response, 10)
        assert resp.code == Code.CHANGED

    async def succeed(self, n: Notice) -> None:
        for st in (LwState.DOWNLOADING, LwState.DOWNLOADED, LwState.UPDATING):
            await self.report(n, st)
        await self.report(n, LwState.IDLE, Result.SUCCESS)


@pytest.fixture
async def coap() -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context()
    yield ctx
    await ctx.shutdown()


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def setup(
    env: Env, coap: aiocoap.Context, n: int, policy: dict[str, Any]
) -> tuple[int, list[ScriptedDevice]]:
    man = await env.manifest(firmware(1024))
    secrets = await env.devices([(f"s{i}", "coap") for i in range(n)])
    cid = await env.campaign(man["id"], policy=policy)
    return cid, [ScriptedDevice(coap, env, name, secret) for name, secret in sorted(secrets.items())]


async def stats(env: Env, cid: int) -> dict[str, Any]:
    return dict(await env.call("GET", f"/campaigns/{cid}/stats"))


async def test_transient_failure_is_retried_with_a_new_attempt(env: Env, coap: aiocoap.Context) -> None:
    policy = {"retries": {"max_attempts": 3, "backoff": "1s"}}
    cid, [dev] = await setup(env, coap, 1, policy)
    await env.call("POST", f"/campaigns/{cid}/start")
    first = await until(dev.notice)
    assert first.attempt == 1
    await dev.report(first, LwState.DOWNLOADING)
    await dev.report(first, LwState.IDLE, Result.CONNECTION_LOST)
    second = await until(lambda: _attempt(dev, 2))
    await dev.succeed(second)
    s = await until(lambda: _state(env, cid, "completed"))
    assert s["counts"]["succeeded"] == 1
    d = (await env.call("GET", f"/campaigns/{cid}/devices"))["items"][0]
    assert d["attempt"] == 2 and d["state"] == "succeeded"


async def test_permanent_failure_is_not_retried(env: Env, coap: aiocoap.Context) -> None:
    cid, [dev] = await setup(env, coap, 1, {"retries": {"max_attempts": 3, "backoff": "1s"}})
    await env.call("POST", f"/campaigns/{cid}/start")
    n = await until(dev.notice)
    await dev.report(n, LwState.IDLE, Result.INTEGRITY_FAILURE)
    s = await until(lambda: _state(env, cid, "completed"))
    assert s["counts"]["failed"] == 1 and s["failures"][0]["name"] == "integrity_failure"


async def test_silent_device_times_out(env: Env, coap: aiocoap.Context) -> None:
    cid, devs = await setup(env, coap, 2, {"device_timeout": "1s"})
    await env.call("POST", f"/campaigns/{cid}/start")
    n = await until(devs[0].notice)
    await devs[0].succeed(n)  # the other device never answers
    s = await until(lambda: _state(env, cid, "completed"))
    assert s["counts"]["succeeded"] == 1 and s["counts"]["timed_out"] == 1


async def test_pause_stops_new_notices_and_resume_continues(env: Env, coap: aiocoap.Context) -> None:
    # one device every 5 s: the pause lands well before the last device is notified, even on a
    # busy machine, and the 6 s watched afterwards would see the next notice if it went out
    cid, devs = await setup(env, coap, 6, {"rate_per_minute": 12})
    await env.call("POST", f"/campaigns/{cid}/start")
    await until(lambda: _count(env, cid, "notified", at_least=1))
    await env.call("POST", f"/campaigns/{cid}/pause")
    await asyncio.sleep(0.5)
    frozen = (await stats(env, cid))["counts"]["pending"]
    await asyncio.sleep(6.0)
    s = await stats(env, cid)
    assert s["state"] == "paused" and s["counts"]["pending"] == frozen > 0
    for d in devs:  # a device already notified may finish while paused
        n = await d.notice()
        if n is not None:
            await d.succeed(n)
    await env.call("POST", f"/campaigns/{cid}/resume")

    async def all_done() -> bool:
        for d in devs:
            n = await d.notice()
            if n is not None and (n.campaign, n.attempt) not in d.seq:
                await d.succeed(n)
        return bool(await _state(env, cid, "completed"))

    await until(all_done, timeout=60)
    assert (await stats(env, cid))["counts"]["succeeded"] == 6


async def test_dynamic_campaign_takes_in_devices_registered_later(env: Env, coap: aiocoap.Context) -> None:
    cid, [dev] = await setup(env, coap, 1, {"dynamic": True})
    await env.call("POST", f"/campaigns/{cid}/start")
    await dev.succeed(await until(dev.notice))
    late = await env.devices([("late", "coap")])
    late_dev = ScriptedDevice(coap, env, "late", late["late"])
    n = await until(late_dev.notice)
    assert n.campaign == cid
    await late_dev.succeed(n)
    s = await until(lambda: _count(env, cid, "succeeded", at_least=2))
    assert s["total"] == 2 and s["state"] == "running"  # dynamic campaigns stay open


async def test_scheduled_start_waits(env: Env, coap: aiocoap.Context) -> None:
    man = await env.manifest(firmware(1024))
    secrets = await env.devices([("s0", "coap")])
    # the start time is set once the fleet exists, so a slow setup cannot make it already past
    start_at = (datetime.now(UTC) + timedelta(seconds=6)).strftime("%Y-%m-%dT%H:%M:%SZ")  # >= 5 s ahead
    cid = await env.campaign(man["id"], policy={"start_at": start_at})
    dev = ScriptedDevice(coap, env, "s0", secrets["s0"])
    started = await env.call("POST", f"/campaigns/{cid}/start")
    assert started["state"] == "scheduled"
    await asyncio.sleep(0.5)
    assert (await stats(env, cid))["counts"]["pending"] == 1
    n = await until(dev.notice, timeout=15)
    assert (await stats(env, cid))["state"] == "running"
    await dev.succeed(n)
    await until(lambda: _state(env, cid, "completed"))


async def test_no_notice_outside_the_maintenance_window(env: Env, coap: aiocoap.Context) -> None:
    now = datetime.now(UTC)
    opens = (now + timedelta(hours=2)).strftime("%H:%M")
    closes = (now + timedelta(hours=3)).strftime("%H:%M")
    window = {"start": opens, "end": closes, "tz": "UTC", "mode": "notify"}
    cid, [dev] = await setup(env, coap, 1, {"window": window})
    await env.call("POST", f"/campaigns/{cid}/start")
    await asyncio.sleep(1.5)
    s = await stats(env, cid)
    assert s["state"] == "running" and s["counts"]["pending"] == 1
    assert s["note"].startswith("outside the maintenance window")  # operators see why
    assert await dev.notice() is None


async def _attempt(dev: ScriptedDevice, attempt: int) -> Notice | None:
    n = await dev.notice()
    return n if n is not None and n.attempt == attempt else None


async def _state(env: Env, cid: int, state: str) -> dict[str, Any] | None:
    s = await stats(env, cid)
    return s if s["state"] == state else None


async def _count(env: Env, cid: int, state: str, at_least: int) -> dict[str, Any] | None:
    s = await stats(env, cid)
    return s if s["counts"][state] >= at_least else None


async def test_approval_phase_pauses_until_resumed(env: Env, coap: aiocoap.Context) -> None:
    policy = {"order": "registration", "phases": [{"size": 1, "advance": "approval"}, {"until": "100%"}]}
    cid, devs = await setup(env, coap, 3, policy)
    await env.call("POST", f"/campaigns/{cid}/start")
    first = await until(devs[0].notice)
    await devs[0].succeed(first)
    paused = await until(lambda: _state(env, cid, "paused"))
    assert "waiting for approval" in paused["stop_reason"] and paused["counts"]["pending"] == 2
    await asyncio.sleep(1.0)
    assert (await stats(env, cid))["counts"]["pending"] == 2  # nobody else is notified meanwhile
    await env.call("POST", f"/campaigns/{cid}/resume")
    for d in devs[1:]:
        await d.succeed(await until(d.notice))
    done = await until(lambda: _state(env, cid, "completed"))
    assert done["counts"]["succeeded"] == 3 and done["phase"] == 1


async def _notified(env: Env, cid: int, devs: list[ScriptedDevice], n: int) -> list[ScriptedDevice] | None:
    page = await env.call("GET", f"/campaigns/{cid}/devices", params={"state": "notified"})
    names = {d["device"] for d in page["items"]}
    return [d for d in devs if d.name in names] if len(names) >= n else None


def _screen(s: dict[str, Any]) -> list[str]:
    console = Console(width=80, record=True, color_system=None, file=io.StringIO())
    console.print(watch.render(s))
    return console.export_text().splitlines()


async def test_watch_of_a_phased_rate_limited_campaign(env: Env, coap: aiocoap.Context) -> None:
    """Phases drawn by the seeded shuffle, a rate limit and an approval gate: the stats' pace
    and ETA follow them, and the watch screen fits 80 columns with the same phase as status."""
    policy = {
        "rate_per_minute": 30,
        "phases": [{"name": "canary", "size": 2, "advance": "approval"}, {"name": "rest"}],
    }
    cid, devs = await setup(env, coap, 12, policy)
    await env.call("POST", f"/campaigns/{cid}/start")
    first = (await until(lambda: _notified(env, cid, devs, 1)))[0]
    await first.succeed(await until(first.notice))
    s = await until(lambda: _count(env, cid, "succeeded", 1))
    assert s["phase_label"] == "phase 1 (canary)" and s["per_minute"] > 0
    assert s["eta_scope"] == "end of phase 1 (canary)"
    assert s["eta_note"] == "then waiting for approval of phase 2 (rest)"
    # one canary device left at 30/min: its notice within 2 s, then one install of this pace
    assert s["eta_s"] is not None and 0 <= s["eta_s"] <= 2 + 10
    lines = _screen(s)
    assert max(len(line) for line in lines) <= 80
    assert any("RUNNING   phase 1/2 (canary)" in line for line in lines)
    assert any(" pending  notified  downloading  downloaded  installing" in line for line in lines)
    assert not any("invited" in line for line in lines)

    second = next(d for d in (await until(lambda: _notified(env, cid, devs, 1))) if d is not first)
    await second.succeed(await until(second.notice))
    paused = await until(lambda: _state(env, cid, "paused"))
    assert paused["eta_s"] is None and paused["eta_note"] == "waiting for approval of phase 2 (rest)"
    assert paused["phase_label"] == "phase 2 (rest)"
    assert any("ETA —" in line for line in _screen(paused))

    await env.call("POST", f"/campaigns/{cid}/resume")
    running = await until(lambda: _state(env, cid, "running"))
    # ten devices at 30 per minute: about 20 s of notices, then one install
    assert running["eta_s"] is not None and 18 <= running["eta_s"] <= 20 + 10
    assert running["eta_scope"] is None
    await env.call("POST", f"/campaigns/{cid}/cancel")
    await until(lambda: _state(env, cid, "cancelled"))
    await until(lambda: _count(env, cid, "cancelled", 1))
    lines = _screen(await stats(env, cid))
    assert any("2/12 done, " in line and " cancelled" in line for line in lines)
