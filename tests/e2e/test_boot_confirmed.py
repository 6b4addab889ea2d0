"""Boot-confirmed success end to end (real Mosquitto, CoAP on UDP, SQLite and PostgreSQL): devices
whose new image fails its health check fall back and are counted ``reverted``, a fallback after
success is seen in the next hello, and an empty start is refused."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from device_sim.faults import get_profile
from device_sim.flash import Flash
from device_sim.fleet import run_fleet
from fwcm.protocol import Result
from fwcm.rollout.outcome import CampaignExit

from .conftest import Env
from .test_campaign import configs, run_campaign


async def test_boot_fail_devices_revert_and_are_counted_apart(env: Env, tmp_path: Path) -> None:
    n = 20
    stats, report, cid = await run_campaign(env, tmp_path, n, faults="boot-fail")
    profile = get_profile("boot-fail")
    bad = {f"d{i:03d}" for i in range(n) if profile.affected(i)}
    assert bad and stats["counts"]["reverted"] == len(bad) and stats["counts"]["succeeded"] == n - len(bad)
    assert stats["counts"]["failed"] == 0
    assert [(f["state"], f["result"], f["count"]) for f in stats["failures"]] == [
        ("reverted", int(Result.REVERTED), len(bad))
    ]
    reverted = await env.call("GET", f"/campaigns/{cid}/devices", params={"state": "reverted"})
    assert {d["device"] for d in reverted["items"]} == bad
    for name, st in report.devices.items():
        assert st.installed_sequence == (1 if name in bad else 2)  # the device says what it runs
    devices = await env.call("GET", "/devices", params={"limit": 100})
    assert {d["name"]: d["sequence"] for d in devices["items"]} == {
        name: 1 if name in bad else 2 for name in report.devices
    }
    assert f"{len(bad)} reverted" in stats["stop_reason"]

    # a fallback after the success (a watchdog reset into the old slot) shows in the next hello
    good = sorted(set(report.devices) - bad)[0]
    flash = Flash(tmp_path / "devices" / good)
    flash.revert()
    flash.save()
    transports = {f"d{i:03d}": ("mqtt" if i % 2 else "coap") for i in range(n)}
    secrets = {name: b"" for name in transports}
    secrets.update(await _secrets(env, tmp_path, good))
    [config] = [c for c in configs(env, secrets, transports, tmp_path) if c.name == good]
    stop = asyncio.Event()
    fleet = asyncio.create_task(
        run_fleet([config], get_profile("none"), until=lambda _r: stop.is_set(), timeout=60)
    )
    deadline = asyncio.get_running_loop().time() + 30
    while (s := await env.call("GET", f"/campaigns/{cid}/stats"))["counts"]["reverted"] == len(bad):
        assert asyncio.get_running_loop().time() < deadline, f"revert not seen: {s['counts']}"
        await asyncio.sleep(0.2)
    stop.set()
    await fleet
    assert s["counts"]["reverted"] == len(bad) + 1 and s["counts"]["succeeded"] == n - len(bad) - 1
    row = await env.call("GET", f"/campaigns/{cid}/devices", params={"state": "reverted", "limit": 100})
    [seen] = [d for d in row["items"] if d["device"] == good]
    assert "hello reports sequence 1" in seen["detail"] and "claimed sequence 2" in seen["detail"]

    # `fwcm campaign status --wait` exits with the code of a completion with reverts
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fwcm.cli",
        "campaign",
        "status",
        str(cid),
        "--wait",
        env=_cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == CampaignExit.COMPLETED_WITH_REVERTS, err.decode()[-2000:]
    assert "reverted" in out.decode()


async def _secrets(env: Env, tmp_path: Path, name: str) -> dict[str, bytes]:
    """A device's secret, as the fleet persisted nothing of it: read back from the server."""
    from sqlalchemy import select

    from fwcm.store.models import Device

    with env.server.db.session() as s:
        secret = s.scalar(select(Device.secret).where(Device.name == name))
    assert secret is not None
    return {name: bytes(secret)}


def _cli_env(env: Env) -> dict[str, str]:
    import os

    return dict(os.environ, FWCM_URL=env.settings.public_http_url, FWCM_API_KEY=env.key)


async def test_an_empty_start_is_refused_and_an_unknown_tag_warned(env: Env) -> None:
    await env.devices([("e1", "mqtt"), ("e2", "coap")])
    image_manifest = await env.manifest(b"x" * 1024)
    created = await env.http.post(
        "/api/v1/campaigns",
        json={"name": "typo", "manifest_id": image_manifest["id"], "filter": 'tag.regoin == "eu"'},
    )
    assert created.status_code == 201
    [warning] = created.json()["warnings"]
    assert "tag.regoin" in warning and "region" in warning
    cid = created.json()["id"]
    refused = await env.http.post(f"/api/v1/campaigns/{cid}/start")
    assert refused.status_code == 409
    assert 'tag.regoin == "eu"' in refused.json()["detail"] and "allow_empty" in refused.json()["detail"]
    started = await env.http.post(f"/api/v1/campaigns/{cid}/start", json={"allow_empty": True})
    assert started.status_code == 200 and started.json()["total"] == 0
