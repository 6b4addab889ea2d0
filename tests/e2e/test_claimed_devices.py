"""A device's life from the factory: registered by its manufacturer, claimed once by a fleet tenant,
updated through an attested campaign with the keys it was made with, and reporting what it runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from device_sim.agent import DeviceConfig
from device_sim.faults import get_profile
from device_sim.fleet import run_fleet
from fwcm import inventory
from fwcm import manifest as mf
from fwcm.store import tenants

from .conftest import Env, firmware
from .test_bad_input import wait_for

pytestmark = pytest.mark.timeout(180)


async def test_claimed_devices_update_and_unclaimed_ones_are_never_targeted(env: Env, tmp_path: Path) -> None:
    with env.server.db.session() as s:
        _m, maker_key = tenants.create_tenant(s, "maker", "Sensor Works", "manufacturer")
    units = inventory.make_batch(3, "e2e.fwcm.example", "sensor-v1", firmware_version="1.0.1", sequence=1)
    async with httpx.AsyncClient(
        base_url=env.settings.public_http_url, headers={"Authorization": f"Bearer {maker_key}"}
    ) as maker:
        r = await maker.post(
            "/api/v1/factory/devices",
            content=inventory.factory_csv(units),
            headers={"content-type": "text/csv"},
        )
        assert r.status_code == 201, r.text

    claimed = units[:2]
    transports = {u.serial: ("mqtt" if i % 2 == 0 else "coap") for i, u in enumerate(claimed)}
    for u in claimed:
        body = {"serial": u.serial, "claim_code": u.claim_code, "transport": transports[u.serial]}
        d = await env.call("POST", "/devices/claim", json=body)
        assert d["tenant"] == "acme" and d["name"] == u.serial
    again = await env.http.post(
        "/api/v1/devices/claim", json={"serial": units[0].serial, "claim_code": units[0].claim_code}
    )
    assert again.status_code == 409

    man = await env.manifest(firmware(10_000, seed=81), sequence=2)
    outdated = await env.call("GET", "/devices/outdated")
    assert sorted(row["device"] for row in outdated["items"]) == sorted(u.serial for u in claimed)

    c = await env.call(
        "POST", "/campaigns", json={"name": "claimed", "manifest_id": man["id"], "attestation": True}
    )
    configs = [
        DeviceConfig(
            name=u.serial,
            tenant="acme",  # learned from the claim (the app that scanned the box tells the device)
            secret=u.secret,
            vendor_id=mf.vendor_id_for_domain(u.vendor),
            class_id=mf.class_id_for(mf.vendor_id_for_domain(u.vendor), u.model),
            transport=transports[u.serial],  # type: ignore[arg-type]
            trust_anchors=[mf.public_key_pem(env.signing_key)],
            state_dir=tmp_path / "devices",
            mqtt_url=env.broker.url,
            coap_url=env.settings.public_coap_url,
            installed_sequence=u.sequence,
            hardware_id=u.hardware_id,
            attest_key=u.attest_private_pem.encode(),
            firmware_name="sensor-works-fw",
            index=i,
        )
        for i, u in enumerate(claimed)
    ]
    stop = asyncio.Event()
    fleet = asyncio.create_task(
        run_fleet(configs, get_profile("none"), until=lambda _r: stop.is_set(), timeout=120)
    )
    await env.call("POST", f"/campaigns/{c['id']}/start")

    async def done() -> bool:
        stats = await env.call("GET", f"/campaigns/{c['id']}/stats")
        return bool(stats["counts"]["succeeded"] == 2)

    await wait_for(done, 90)
    await asyncio.sleep(1.0)
    stop.set()
    report = await fleet
    stats = await env.call("GET", f"/campaigns/{c['id']}/stats")
    assert stats["total"] == 2  # the unclaimed device is nobody's: never targeted
    assert all(report.devices[u.serial].credentials == 1 for u in claimed)
    for u in claimed:
        d = await env.call("GET", f"/devices/{u.serial}")
        assert d["sequence"] == 2  # the device's own receipt after the reboot
        assert (d["version"], d["firmware_name"], d["attestation_key"]) == ("1.0.2", "sensor-works-fw", True)
    assert (await env.call("GET", "/devices/outdated"))["items"] == []
