"""A campaign with a two-component manifest end to end (real Mosquitto, CoAP on UDP, SQLite and
PostgreSQL): the server takes the envelope, every device installs both images together."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from device_sim.faults import get_profile
from device_sim.flash import Flash
from device_sim.fleet import run_fleet
from device_sim.update import part_name
from fwcm import manifest as mf

from .conftest import CLASS, VENDOR, Env, firmware
from .test_campaign import configs


async def two_component_manifest(env: Env, app: bytes, radio: bytes) -> dict[str, Any]:
    parts = []
    for name, image in ((b"app", app), (b"radio", radio)):
        sha = hashlib.sha256(image).hexdigest()
        await env.call("POST", "/payloads", content=image)
        uris = (f"{env.settings.public_http_url}/p/{sha}", f"{env.settings.public_coap_url}/p/{sha}")
        parts.append(mf.Component((name,), bytes.fromhex(sha), len(image), uris))
    info = mf.ManifestInfo(
        sequence=2,
        vendor_id=VENDOR,
        class_id=CLASS,
        image_digest=parts[0].image_digest,
        image_size=parts[0].image_size,
        uris=parts[0].uris,
        component_id=parts[0].id,
        extra_components=(parts[1],),
    )
    envelope = mf.build_envelope(info, env.signing_key)
    return dict(
        await env.call("POST", "/manifests", content=envelope, headers={"content-type": "application/cbor"})
    )


async def test_campaign_with_two_components(env: Env, tmp_path: Path) -> None:
    app, radio = firmware(24 * 1024, seed=11), firmware(9 * 1024, seed=12)
    man = await two_component_manifest(env, app, radio)
    transports = {f"d{i:03d}": ("mqtt" if i % 2 else "coap") for i in range(6)}
    secrets = await env.devices(list(transports.items()))
    cid = await env.campaign(man["id"])
    stop = asyncio.Event()
    fleet = asyncio.create_task(
        run_fleet(
            configs(env, secrets, transports, tmp_path),
            get_profile("none"),
            until=lambda _r: stop.is_set(),
            timeout=120,
        )
    )
    await env.call("POST", f"/campaigns/{cid}/start")
    deadline = asyncio.get_running_loop().time() + 120
    while True:
        stats = await env.call("GET", f"/campaigns/{cid}/stats")
        if stats["state"] == "completed" and stats["counts"]["succeeded"] + stats["counts"]["failed"] == 6:
            break
        assert asyncio.get_running_loop().time() < deadline, f"campaign did not end: {stats}"
        await asyncio.sleep(0.2)
    stop.set()
    report = await fleet
    assert stats["counts"]["succeeded"] == 6, stats
    assert all(s.installed_sequence == 2 for s in report.devices.values())
    radio_part, radio_sha = part_name((b"radio",)), hashlib.sha256(radio).hexdigest()
    for name in transports:
        flash = Flash(tmp_path / "devices" / name)
        active = flash.state.active
        assert flash.active_image() == app
        assert flash.read_slot(active, radio_part) == radio
        assert flash.state.slots[active].components == {radio_part: radio_sha}
