"""LwM2M campaigns end to end: the server's LwM2M endpoint on UDP loopback, simulated LwM2M
clients (text, TLV, SenML JSON and SenML CBOR), real payload downloads, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import resource
from aiocoap.numbers.codes import Code

from device_sim.agent import DeviceConfig
from device_sim.faults import DeviceFaults, get_profile
from device_sim.fleet import FleetReport, run_fleet
from device_sim.lwm2m import Lwm2mAgent
from device_sim.transports import SharedClients
from fwcm import manifest as mf
from fwcm.protocol import LwState, Result

from .conftest import CLASS, VENDOR, Env, firmware


def configs(env: Env, secrets: dict[str, bytes], transports: dict[str, str], tmp: Path) -> list[DeviceConfig]:
    return [
        DeviceConfig(
            name=name,
            tenant="acme",
            secret=secrets[name],
            vendor_id=VENDOR,
            class_id=CLASS,
            transport=transports[name],  # type: ignore[arg-type]
            trust_anchors=[mf.public_key_pem(env.signing_key)],
            state_dir=tmp / "devices",
            mqtt_url=env.broker.url,
            coap_url=env.settings.public_coap_url,
            lwm2m_url=f"coap://{env.settings.lwm2m_host}:{env.settings.lwm2m_port}",
            installed_sequence=1,
            index=i,
        )
        for i, name in enumerate(sorted(secrets))
    ]


async def run(
    env: Env,
    tmp: Path,
    transports: dict[str, str],
    *,
    faults: str = "none",
    policy: dict[str, Any] | None = None,
    image: bytes | None = None,
) -> tuple[dict[str, Any], FleetReport, int]:
    """Run a campaign of ``transports``' devices until it ends; its stats, the fleet, its id."""
    man = await env.manifest(image or firmware(20 * 1024))
    secrets = await env.devices(list(transports.items()))
    cid = await env.campaign(man["id"], policy=policy)
    stop = asyncio.Event()
    fleet = asyncio.create_task(
        run_fleet(configs(env, secrets, transports, tmp), get_profile(faults), until=lambda _r: stop.is_set())
    )
    await env.call("POST", f"/campaigns/{cid}/start")
    deadline = asyncio.get_running_loop().time() + 120
    stats: dict[str, Any] = {}
    while True:
        stats = await env.call("GET", f"/campaigns/{cid}/stats")
        busy = sum(stats["counts"][s] for s in ("notified", "downloading", "downloaded", "installing"))
        if stats["state"] in ("completed", "stopped") and busy == 0:
            break
        assert asyncio.get_running_loop().time() < deadline, f"campaign did not end: {stats}"
        await asyncio.sleep(0.2)
    stop.set()
    return stats, await fleet, cid


async def test_lwm2m_campaign_succeeds_in_every_content_format(env: Env, tmp_path: Path) -> None:
    image = firmware(20 * 1024, seed=11)
    transports = {f"l{i:02d}": "lwm2m" for i in range(8)}
    stats, report, cid = await run(env, tmp_path, transports, image=image)
    assert stats["state"] == "completed" and stats["counts"]["succeeded"] == 8, stats
    # every device runs the image it downloaded, and says so in /3/0/3
    digest = hashlib.sha256(image).hexdigest()
    for name, st in report.devices.items():
        assert st.results and max(st.results.items())[1] == Result.SUCCESS, name
        state = (tmp_path / "devices" / name / "state.json").read_text()
        assert digest in state
    devices = await env.call("GET", f"/campaigns/{cid}/devices")
    assert {d["state"] for d in devices["items"]} == {"succeeded"}
    lw = env.server.lwm2m
    assert lw is not None and lw.counts.refused == 0 and lw.counts.executed >= 8
    # the devices de-registered when the fleet stopped
    assert not lw.clients


async def test_staged_lwm2m_campaign_stops_at_its_error_threshold(env: Env, tmp_path: Path) -> None:
    """install-fail: every 10th device from index 5 fails with Update Result 8 (as LwM2M reports
    it: back to Downloaded); a phase's error threshold of 1 device stops the campaign."""
    transports = {f"s{i:02d}": "lwm2m" for i in range(20)}
    policy = {
        "order": "registration",
        "rate_per_minute": 60,
        "phases": [
            {"name": "canary", "size": 4},
            {"name": "rest", "error_threshold": "5%", "error_min_devices": 1},
        ],
    }
    stats, report, cid = await run(env, tmp_path, transports, faults="install-fail", policy=policy)
    assert stats["state"] == "stopped", stats
    assert "error threshold" in (stats.get("stop_reason") or ""), stats
    devices = (await env.call("GET", f"/campaigns/{cid}/devices", params={"limit": 100}))["items"]
    failed = [d for d in devices if d["state"] == "failed"]
    assert failed and {d["result"] for d in failed} == {int(Result.UPDATE_FAILED)}
    assert {d["device"] for d in failed} <= {"s05", "s15"}
    # the canary succeeded before the failure, and not every device was notified
    assert sum(1 for d in devices if d["state"] == "succeeded") >= 4
    assert any(d["state"] == "pending" for d in devices)
    assert report.devices["s05"].results.get(1) == Result.UPDATE_FAILED


async def test_mixed_campaign_of_mqtt_coap_and_lwm2m_devices(env: Env, tmp_path: Path) -> None:
    kinds = ("mqtt", "coap", "lwm2m")
    transports = {f"m{i:02d}": kinds[i % 3] for i in range(9)}
    stats, _report, cid = await run(env, tmp_path, transports, faults="corrupt")
    # corrupt: index 3 (an mqtt device, integrity check of its manifest digest) fails; the
    # LwM2M devices check the digest the Package URI names
    devices = (await env.call("GET", f"/campaigns/{cid}/devices"))["items"]
    states = {d["device"]: (d["state"], d["result"]) for d in devices}
    assert states.pop("m03") == ("failed", int(Result.INTEGRITY_FAILURE))
    assert {s for s, _r in states.values()} == {"succeeded"}, states
    assert stats["state"] == "completed"


async def test_lwm2m_corrupt_download_fails_its_integrity_check(env: Env, tmp_path: Path) -> None:
    transports = {f"c{i:02d}": "lwm2m" for i in range(4)}
    _stats, _report, cid = await run(env, tmp_path, transports, faults="corrupt")
    devices = (await env.call("GET", f"/campaigns/{cid}/devices"))["items"]
    states = {d["device"]: (d["state"], d["result"]) for d in devices}
    assert states.pop("c03") == ("failed", int(Result.INTEGRITY_FAILURE))
    assert {s for s, _r in states.values()} == {"succeeded"}


async def test_bad_registrations_are_refused_and_counted(env: Env, tmp_path: Path) -> None:
    await env.devices([("r1", "lwm2m"), ("r2", "lwm2m"), ("q1", "mqtt")])
    lw = env.server.lwm2m
    assert lw is not None
    base = f"coap://{env.settings.lwm2m_host}:{env.settings.lwm2m_port}"
    ctx = await aiocoap.Context.create_client_context()
    try:

        async def post(query: str, payload: bytes = b"</5/0>") -> aiocoap.Message:
            msg = aiocoap.Message(code=Code.POST, uri=f"{base}/rd?{query}", payload=payload)
            return await asyncio.wait_for(ctx.request(msg).response, 10)

        assert (await post("lt=60")).code == Code.BAD_REQUEST  # no endpoint
        assert (await post("ep=r1")).code == Code.BAD_REQUEST  # not tenant:device
        assert (await post("ep=acme:r1", b"\xff\x00junk")).code == Code.BAD_REQUEST
        assert (await post("ep=acme:nobody")).code == Code.FORBIDDEN  # unknown device
        assert (await post("ep=acme:q1")).code == Code.FORBIDDEN  # an MQTT device
        assert (await post("ep=other:r1")).code == Code.FORBIDDEN  # another tenant's name
        assert lw.counts.refused == 6 and not lw.clients
        ok = await post("ep=acme:r1&lt=60&lwm2m=1.1&b=U", b"</1/0>,</3/0>")
        assert ok.code == Code.CREATED and ok.opt.location_path[0] == "rd"
        assert ("acme", "r1") in lw.clients
        location = "/".join(ok.opt.location_path)
        update = aiocoap.Message(code=Code.POST, uri=f"{base}/{location}?lt=120")
        assert (await asyncio.wait_for(ctx.request(update).response, 10)).code == Code.CHANGED
        gone = aiocoap.Message(code=Code.DELETE, uri=f"{base}/{location}")
        assert (await asyncio.wait_for(ctx.request(gone).response, 10)).code == Code.DELETED
        again = aiocoap.Message(code=Code.DELETE, uri=f"{base}/{location}")
        assert (await asyncio.wait_for(ctx.request(again).response, 10)).code == Code.NOT_FOUND
        assert not lw.clients
        # one address, one client: a device registering from where another was replaces it
        assert (await post("ep=acme:r1&lt=60", b"</5/0>")).code == Code.CREATED
        assert (await post("ep=acme:r2&lt=60", b"</5/0>")).code == Code.CREATED
        assert list(lw.clients) == [("acme", "r2")]
    finally:
        await ctx.shutdown()


async def test_cancelled_campaign_writes_an_empty_package_uri(env: Env, tmp_path: Path) -> None:
    """Devices downloading slowly when the campaign is cancelled: the server writes an empty
    Package URI, which stops their download and resets /5 to Idle; nothing is installed."""
    man = await env.manifest(firmware(160 * 1024, seed=5))
    secrets = await env.devices([(f"x{i}", "lwm2m") for i in range(3)])
    transports = dict.fromkeys(secrets, "lwm2m")
    clients = SharedClients()
    agents = [
        Lwm2mAgent(cfg, clients, faults=DeviceFaults(throttle_bps=16 * 1024))
        for cfg in configs(env, secrets, transports, tmp_path)
    ]
    tasks = [asyncio.create_task(a.run()) for a in agents]
    try:
        cid = await env.campaign(man["id"])
        await env.call("POST", f"/campaigns/{cid}/start")
        deadline = asyncio.get_running_loop().time() + 60
        while not all(a.state == LwState.DOWNLOADING for a in agents):
            assert asyncio.get_running_loop().time() < deadline, [a.state for a in agents]
            await asyncio.sleep(0.1)
        await env.call("POST", f"/campaigns/{cid}/cancel")
        while not all(a.state == LwState.IDLE and a.uri == "" for a in agents):
            assert asyncio.get_running_loop().time() < deadline, [(a.state, a.uri[:20]) for a in agents]
            await asyncio.sleep(0.1)
        devices = (await env.call("GET", f"/campaigns/{cid}/devices"))["items"]
        assert {d["state"] for d in devices} == {"cancelled"}
        assert all(a.flash.state.installed_sequence == 1 and a.updates == 0 for a in agents)
        assert all(a.result == Result.INITIAL for a in agents)
    finally:
        for a in agents:
            a.stop()
        await asyncio.gather(*tasks)
        await clients.aclose()


class Garbage(resource.ObservableResource):
    """A /5 resource that answers what no LwM2M device may: a TLV cut short, then 99."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self.reads += 1
        payload = b"\xc8\x03\x40" if self.reads % 2 else b"99"
        return aiocoap.Message(
            code=Code.CONTENT, payload=payload, content_format=11542 if self.reads % 2 else 0
        )


class Accepting(resource.Resource):
    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=Code.CHANGED)


async def test_garbage_from_a_device_is_counted_and_the_others_update(env: Env, tmp_path: Path) -> None:
    """One registered client answers garbage for its /5 state and result: the server counts and
    ignores it (its deployment stays notified), while a well-behaved device updates."""
    man = await env.manifest(firmware(8 * 1024))
    secrets = await env.devices([("bad", "lwm2m"), ("good", "lwm2m")])
    lw = env.server.lwm2m
    assert lw is not None
    site = resource.Site()
    garbage = Garbage()
    for path in (("5", "0", "3"), ("5", "0", "5")):
        site.add_resource(path, garbage)
    site.add_resource(("5", "0", "1"), Accepting())
    bad = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", 0))
    clients = SharedClients()
    good_cfg = [
        c for c in configs(env, secrets, {"bad": "lwm2m", "good": "lwm2m"}, tmp_path) if c.name == "good"
    ]
    good = Lwm2mAgent(good_cfg[0], clients)
    task = asyncio.create_task(good.run())
    try:
        base = f"coap://{env.settings.lwm2m_host}:{env.settings.lwm2m_port}"
        reg = aiocoap.Message(code=Code.POST, uri=f"{base}/rd?ep=acme:bad&lt=60", payload=b"</5/0>")
        assert (await asyncio.wait_for(bad.request(reg).response, 10)).code == Code.CREATED
        cid = await env.campaign(man["id"])
        await env.call("POST", f"/campaigns/{cid}/start")
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            devices = {
                d["device"]: d["state"] for d in (await env.call("GET", f"/campaigns/{cid}/devices"))["items"]
            }
            if devices.get("good") == "succeeded" and lw.counts.reasons.get("lwm2m", 0) >= 2:
                break
            assert asyncio.get_running_loop().time() < deadline, (devices, lw.counts)
            await asyncio.sleep(0.2)
        assert devices["bad"] == "notified" and garbage.reads >= 2
    finally:
        good.stop()
        await task
        await clients.aclose()
        await bad.shutdown()


async def test_lwm2m_devices_download_over_http_when_told(env: Env, tmp_path: Path) -> None:
    """FWCM_LWM2M_PACKAGE_URL with an http:// base: the Package URI sends devices to the HTTP
    payload endpoint, which they fetch from and check as over CoAP."""
    lw = env.server.lwm2m
    assert lw is not None
    written: list[str] = []
    base = env.settings.public_http_url

    def http_uri(digest: bytes) -> str:
        written.append(f"{base}/p/{digest.hex()}")
        return written[-1]

    lw.package_uri = http_uri
    image = firmware(30 * 1024, seed=3)
    stats, _report, _cid = await run(env, tmp_path, {f"h{i}": "lwm2m" for i in range(4)}, image=image)
    assert stats["counts"]["succeeded"] == 4, stats
    assert written and all(u == f"{base}/p/{hashlib.sha256(image).hexdigest()}" for u in written)
    for i in range(4):
        assert (
            hashlib.sha256(image).hexdigest() in (tmp_path / "devices" / f"h{i}" / "state.json").read_text()
        )
