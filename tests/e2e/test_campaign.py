"""Campaigns end to end: real server, broker, CoAP on UDP, HTTP payloads, and the simulated fleet."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from device_sim.agent import DeviceConfig
from device_sim.faults import get_profile
from device_sim.fleet import FleetReport, run_fleet
from fwcm import manifest as mf
from fwcm.protocol import Result

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
            installed_sequence=1,
            index=i,
        )
        for i, name in enumerate(sorted(secrets))
    ]


async def run_campaign(env: Env, tmp: Path, n: int, faults: str = "none") -> tuple[dict, FleetReport, int]:  # type: ignore[type-arg]
    image = firmware(24 * 1024)
    man = await env.manifest(image)
    transports = {f"d{i:03d}": ("mqtt" if i % 2 else "coap") for i in range(n)}
    secrets = await env.devices(list(transports.items()))
    cid = await env.campaign(man["id"])
    done = {"stats": None}

    async def ended() -> bool:
        stats = await env.call("GET", f"/campaigns/{cid}/stats")
        done["stats"] = stats
        busy = sum(stats["counts"][s] for s in ("notified", "downloading", "downloaded", "installing"))
        return stats["state"] == "completed" and busy == 0

    import asyncio

    stop = asyncio.Event()
    fleet = asyncio.create_task(
        run_fleet(
            configs(env, secrets, transports, tmp),
            get_profile(faults),
            until=lambda _r: stop.is_set(),
            timeout=120,
        )
    )
    await env.call("POST", f"/campaigns/{cid}/start")
    deadline = asyncio.get_running_loop().time() + 120
    while not await ended():
        assert asyncio.get_running_loop().time() < deadline, f"campaign did not end: {done['stats']}"
        await asyncio.sleep(0.2)
    stop.set()
    report = await fleet
    return done["stats"], report, cid  # type: ignore[return-value]


async def test_mixed_campaign_completes_on_both_databases(env: Env, tmp_path: Path) -> None:
    stats, report, cid = await run_campaign(env, tmp_path, 12)
    assert stats["counts"]["succeeded"] == 12 and stats["total"] == 12
    assert all(s.installed_sequence == 2 for s in report.devices.values())
    devices = await env.call("GET", "/devices", params={"limit": 100})
    assert {d["sequence"] for d in devices["items"]} == {2}  # the hello after reboot recorded it
    events = (await env.call("GET", f"/campaigns/{cid}/events"))["items"]
    assert [e["state"] for e in events][-1] == "completed"
    # `fwcm campaign watch` on the finished campaign renders the final screen and exits 0
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fwcm.cli",
        "campaign",
        "watch",
        str(cid),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, FWCM_URL=env.settings.public_http_url, FWCM_API_KEY=env.key, COLUMNS="120"),
    )  # the server runs on this event loop: the watcher must not block it
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "COMPLETED" in out.decode() and "12/12" in out.decode()
    metrics = (await env.http.get("/metrics")).text
    assert 'fwcm_campaigns{state="completed"} 1.0' in metrics
    assert 'fwcm_notices_sent_total{kind="update",transport="coap"}' in metrics
    assert 'fwcm_reports_ingested_total{transport="mqtt"}' in metrics
    [rss] = [line for line in metrics.splitlines() if line.startswith("fwcm_process_resident_memory_bytes ")]
    assert float(rss.split()[1]) > 10e6  # the server process's own memory, for sizing


async def test_corrupt_payloads_fail_with_integrity_and_keep_old_firmware(env: Env, tmp_path: Path) -> None:
    stats, report, cid = await run_campaign(env, tmp_path, 20, faults="corrupt")
    profile = get_profile("corrupt")
    bad = {f"d{i:03d}" for i in range(20) if profile.affected(i)}
    assert bad and stats["counts"]["failed"] == len(bad) and stats["counts"]["succeeded"] == 20 - len(bad)
    failed = await env.call("GET", f"/campaigns/{cid}/devices", params={"state": "failed"})
    assert {d["device"] for d in failed["items"]} == bad
    assert {d["result"] for d in failed["items"]} == {int(Result.INTEGRITY_FAILURE)}
    for name in bad:
        assert report.devices[name].installed_sequence == 1  # old firmware still running


@pytest.mark.parametrize("broker", ["default", "amqtt"])
def test_demo_command_json(tmp_path: Path, broker: str) -> None:
    """`fwcm demo --json` as a user runs it, also on the embedded broker used where Mosquitto is absent."""
    out = subprocess.run(
        [sys.executable, "-m", "fwcm.cli", "demo", "--devices", "16", "--transport", "mixed", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, FWCM_BROKER=broker),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["succeeded"] == 16 and result["campaign_state"] == "completed"
    assert result["by_state"] == {"succeeded": 16} and result["notified"] == 16


@pytest.mark.parametrize("faults", ["corrupt", "install-fail"])
def test_demo_with_failures_exits_zero_when_as_expected(tmp_path: Path, faults: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fwcm.cli", "demo", "--devices", "20", "--faults", faults, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = get_profile(faults).count_affected(20)
    assert result["failed"] == expected and result["succeeded"] == 20 - expected


@pytest.mark.parametrize("first", ["mqtt", "coap"])
async def test_cancel_withdraws_notices_and_stops_devices(env: Env, tmp_path: Path, first: str) -> None:
    """Pending devices are cancelled at once; devices mid-download stop and report cancelled, over
    either transport (``first``: how the device that is cancelled mid-download speaks)."""
    import asyncio

    image = firmware(1024 * 1024)  # the first (throttled) device needs ~20 s: ample time to cancel it
    man = await env.manifest(image)
    other = "coap" if first == "mqtt" else "mqtt"
    transports = {f"d{i:03d}": (first if i % 2 == 0 else other) for i in range(12)}
    secrets = await env.devices(list(transports.items()))
    cid = await env.campaign(man["id"], policy={"rate_per_minute": 6})
    stop = asyncio.Event()
    fleet = asyncio.create_task(
        run_fleet(
            configs(env, secrets, transports, tmp_path),
            get_profile("slow"),
            until=lambda _r: stop.is_set(),
            timeout=120,
        )
    )
    await env.call("POST", f"/campaigns/{cid}/start")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while (await env.call("GET", f"/campaigns/{cid}/stats"))["counts"]["downloading"] == 0:
        assert loop.time() < deadline
        await asyncio.sleep(0.1)
    await env.call("POST", f"/campaigns/{cid}/cancel")
    while True:
        stats = await env.call("GET", f"/campaigns/{cid}/stats")
        if stats["finished_at"] and all(
            stats["counts"][s] == 0
            for s in ("pending", "notified", "downloading", "downloaded", "installing")
        ):
            break
        assert loop.time() < deadline, stats
        await asyncio.sleep(0.2)
    stop.set()
    await fleet
    assert stats["state"] == "cancelled"
    devices = (await env.call("GET", f"/campaigns/{cid}/devices", params={"limit": 100}))["items"]
    never_notified = [d for d in devices if d["attempt"] == 0]
    assert len(never_notified) >= 6 and all(d["state"] == "cancelled" for d in never_notified)
    assert {d["state"] for d in devices} <= {"cancelled", "succeeded"}
    stopped = [d for d in devices if d["attempt"] == 1 and d["state"] == "cancelled"]
    assert stopped and all(d["result"] == int(Result.CANCELLED) for d in stopped), devices


async def test_device_payload_route_on_the_running_server(env: Env) -> None:
    """/p/{sha256} as devices see it on the running server: ranges, ETag, HEAD and 404."""
    import hashlib

    image = firmware(70_000, seed=11)
    sha = hashlib.sha256(image).hexdigest()
    await env.call("POST", "/payloads", content=image)
    anon = env.http.__class__(base_url=env.settings.public_http_url)
    try:
        full = await anon.get(f"/p/{sha}")
        assert full.status_code == 200 and full.content == image and full.headers["etag"] == f'"{sha}"'
        part = await anon.get(f"/p/{sha.upper()}", headers={"Range": "bytes=65536-"})
        assert part.status_code == 206 and part.content == image[65536:]
        assert part.headers["content-range"] == f"bytes 65536-69999/{len(image)}"
        assert (await anon.get(f"/p/{sha}", headers={"Range": "bytes=80000-"})).status_code == 416
        assert (await anon.get(f"/p/{sha}", headers={"If-None-Match": f'"{sha}"'})).status_code == 304
        head = await anon.head(f"/p/{sha}")
        assert (
            head.status_code == 200 and head.headers["content-length"] == str(len(image)) and not head.content
        )
        assert (await anon.get(f"/p/{'0' * 64}")).status_code == 404
        assert (await anon.get("/p/not-a-digest")).status_code == 404
    finally:
        await anon.aclose()
