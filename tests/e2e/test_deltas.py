"""Delta updates the server makes: a real server (SQLite and PostgreSQL), broker, CoAP and HTTP,
the release signed by a key the server holds, and simulated devices that patch their running
image, one of which does not run the base it last reported and falls back to the full image."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import update

from device_sim.agent import DeviceConfig
from device_sim.faults import get_profile
from device_sim.fleet import run_fleet
from fwcm import manifest as mf
from fwcm import pki
from fwcm.cli.demo_report import small_change
from fwcm.server.deltas import NO_SIGNER
from fwcm.store.models import Device

from .conftest import CLASS, VENDOR, Env, firmware


async def held_release(env: Env, tmp: Path, image: bytes) -> tuple[dict[str, Any], bytes]:
    """The image's manifest, signed by a signer the server holds (no approval needed), and the
    operator root (PEM) devices check its chain to."""
    root_key = mf.generate_private_key("es256")
    root = pki.make_root(root_key, "e2e operator root")
    (tmp / "root.pem").write_bytes(pki.cert_pem(root))
    env.settings.pki_root = tmp / "root.pem"
    ca = await env.call("POST", "/signing/ca")
    ca_cert = pki.make_tenant_ca(root_key, root, mf.load_public_key(ca["public_key_pem"].encode()), "acme")
    await env.call("PUT", "/signing/ca/cert", json={"cert_pem": pki.cert_pem(ca_cert).decode()})
    await env.call("POST", "/signing/signers", json={"name": "held-release", "approvals": 0})
    sha = hashlib.sha256(image).hexdigest()
    await env.call("POST", "/payloads", content=image)
    release = await env.call(
        "POST",
        "/releases",
        json={
            "signer": "held-release",
            "sequence": 2,
            "vendor_id": str(VENDOR),
            "class_id": str(CLASS),
            "image_digest": sha,
            "image_size": len(image),
            "uris": [f"{env.settings.public_http_url}/p/{sha}", f"{env.settings.public_coap_url}/p/{sha}"],
        },
    )
    assert release["state"] == "signed"
    return await env.call("GET", f"/manifests/{release['manifest_id']}"), pki.cert_pem(root)


def device(
    env: Env, name: str, secret: bytes, i: int, root: bytes, tmp: Path, base: bytes | None
) -> DeviceConfig:
    account = env.mqtt_accounts[name]
    return DeviceConfig(
        name=name,
        tenant="acme",
        secret=secret,
        vendor_id=VENDOR,
        class_id=CLASS,
        transport="mqtt" if i % 2 else "coap",
        trust_anchors=[],
        trust_root=root,
        state_dir=tmp / "devices",
        mqtt_url=env.broker.url,
        mqtt_username=account[0],
        mqtt_password=account[1],
        coap_url=env.settings.public_coap_url,
        installed_sequence=1,
        index=i,
        base_image=base,
    )


async def served(env: Env) -> dict[str, float]:
    """Payload bytes sent so far by kind, from ``/metrics`` (summed over transports)."""
    out = {"delta": 0.0, "full": 0.0}
    for line in (await env.http.get("/metrics")).text.splitlines():
        if line.startswith("fwcm_payload_bytes_served_total{"):
            kind = "delta" if 'kind="delta"' in line else "full"
            out[kind] += float(line.rsplit(" ", 1)[1])
    return out


async def until(check: Any, timeout: float = 90.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := await check()):
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.2)
    return value


async def test_a_campaign_mixes_patches_and_full_images(env: Env, tmp_path: Path) -> None:
    v1 = firmware(24 * 1024, seed=31)
    v2 = small_change(v1)
    man, root = await held_release(env, tmp_path, v2)
    await env.call("POST", "/payloads", content=v1)  # the server holds the base
    names = [f"x{i}" for i in range(6)]
    secrets = await env.devices([(n, "mqtt" if i % 2 else "coap") for i, n in enumerate(names)])
    # x0-x3 run 1.0; x4 an image of its own; x5 too, though the server will believe it runs 1.0
    bases = {n: (v1 if i < 4 else None) for i, n in enumerate(names)}
    configs = [device(env, n, secrets[n], i, root, tmp_path, bases[n]) for i, n in enumerate(names)]
    stop = asyncio.Event()
    fleet = asyncio.create_task(
        run_fleet(configs, get_profile("none"), until=lambda _r: stop.is_set(), timeout=150)
    )

    async def all_said() -> bool:
        page = await env.call("GET", "/devices", params={"limit": 100})
        return all(d["image_digest"] for d in page["items"])

    await until(all_said)
    with env.server.db.session() as s:  # x5 was reflashed in the field since it last said
        s.execute(
            update(Device).where(Device.name == "x5").values(image_digest=hashlib.sha256(v1).hexdigest())
        )
    cid = await env.campaign(man["id"], policy={"delta": True})
    before = await served(env)
    await env.call("POST", f"/campaigns/{cid}/start")

    async def ended() -> dict[str, Any] | None:
        stats = await env.call("GET", f"/campaigns/{cid}/stats")
        return stats if stats["state"] == "completed" else None

    stats = await until(ended)
    stop.set()
    report = await fleet
    assert stats["counts"]["succeeded"] == 6, stats
    assert {n: st.installed_sequence for n, st in report.devices.items()} == dict.fromkeys(names, 2)

    patch = next(
        p for p in (await env.call("GET", "/payloads"))["items"] if (p["name"] or "").startswith("patch")
    )
    assert patch["size"] < len(v2) // 10
    refused = await env.http.delete(f"/api/v1/payloads/{patch['sha256']}")
    assert refused.status_code == 409 and "used by manifest" in refused.json()["detail"]
    b = stats["bytes"]
    assert b["devices_on_delta"] == 4 and b["delta"] == 4 * patch["size"]
    assert b["full"] == 2 * len(v2) and b["without_deltas"] == 6 * len(v2)

    after = await served(env)
    # at least each device's bytes (a CoAP block sent again is counted again)
    assert after["delta"] - before["delta"] >= b["delta"]
    assert after["full"] - before["full"] >= b["full"]
    deployments = {d["device"]: d for d in (await env.call("GET", f"/campaigns/{cid}/devices"))["items"]}
    assert deployments["x5"]["attempt"] == 2 and {deployments[n]["attempt"] for n in names[:5]} == {1}
    history = (await env.call("GET", "/devices/x5/events"))["items"]
    assert any("the full image follows" in (h["detail"] or "") for h in history)
    events = [e["reason"] or "" for e in (await env.call("GET", f"/campaigns/{cid}/events"))["items"]]
    assert any(r.startswith("deltas: 1 of 2 source images patched") for r in events), events
    assert any("full image for 1 devices: the server does not hold this source image" in r for r in events)
    audit = (await env.call("GET", "/audit", params={"limit": 200}))["items"]
    assert [a["object"]["base"] for a in audit if a["action"] == "EVENT delta.signed"] == [
        hashlib.sha256(v1).hexdigest()
    ]


async def test_no_delta_for_a_manifest_the_server_did_not_sign(env: Env) -> None:
    v1 = firmware(8 * 1024, seed=32)
    await env.call("POST", "/payloads", content=v1)
    man = await env.manifest(small_change(v1))  # signed by the tenant's own key, elsewhere
    await env.devices([("y0", "mqtt"), ("y1", "coap")])
    with env.server.db.session() as s:
        s.execute(update(Device).values(image_digest=hashlib.sha256(v1).hexdigest()))
    cid = await env.campaign(man["id"], policy={"delta": "40%"})
    await env.call("POST", f"/campaigns/{cid}/start")
    events = [e["reason"] or "" for e in (await env.call("GET", f"/campaigns/{cid}/events"))["items"]]
    assert f"deltas: 0 of 1 source images patched; full image for 2 devices: {NO_SIGNER}" in events
    payloads = (await env.call("GET", "/payloads"))["items"]
    assert not any((p["name"] or "").startswith("patch") for p in payloads)  # nothing was made


def test_delta_demo_sends_a_fraction_of_the_image_bytes(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fwcm.cli", "demo", "--devices", "100", "--delta", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["succeeded"] == 100 and result["device_results"] == {"success": 100}
    d = result["delta"]
    assert d["devices_on_delta"] == 90  # the tenth running images of their own got the full image
    assert d["sent"] == d["delta"] + d["full"] and d["sent"] <= d["without_deltas"] / 3
