"""A small MQTT campaign run against a started server: the devices connect through the broker
URLs given (a cluster's nodes, a TLS listener) with the MQTT credentials their registration
returned, and the campaign is followed until it completes."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from device_sim.agent import DeviceConfig
from device_sim.faults import get_profile
from device_sim.fleet import FleetReport, run_fleet
from fwcm import manifest as mf
from fwcm.config import Settings
from fwcm.server.app import Server
from fwcm.store import tenants
from fwcm.transport.broker import Broker, free_port


@asynccontextmanager
async def running_server(data_dir: Path, broker: Broker, replica: str) -> AsyncIterator[Server]:
    """A server on free loopback ports, linked to ``broker`` (keeping its accounts, if it has
    any); stopped on exit."""
    settings = Settings(
        data_dir=data_dir,
        http_port=free_port(),
        coap_port=free_port(socket.SOCK_DGRAM),
        **broker.server_settings(),  # type: ignore[arg-type]
    )
    srv = Server(settings, replica=replica)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@dataclass
class CampaignRun:
    stats: dict[str, Any]
    report: FleetReport
    names: list[str]


async def run_mqtt_campaign(
    server: Server,
    broker_urls: list[str],
    state_dir: Path,
    *,
    devices: int,
    vendor: uuid.UUID,
    klass: uuid.UUID,
    image_size: int = 8 * 1024,
) -> CampaignRun:
    """Register ``devices`` MQTT devices, spread them over ``broker_urls``, wait until each said
    hello, then run one campaign to its end (bounded: about three minutes on a loaded machine)."""
    settings = server.settings
    with server.db.session() as s:
        _t, key = tenants.create_tenant(s, "acme", "Acme")
    signing = mf.generate_private_key("es256")
    async with httpx.AsyncClient(
        base_url=settings.public_http_url + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as api:

        async def call(method: str, path: str, **kw: Any) -> Any:
            r = await api.request(method, path, **kw)
            assert r.status_code < 400, f"{method} {path}: {r.status_code} {r.text}"
            return r.json()

        await call(
            "POST", "/signers", json={"name": "rel", "public_key_pem": mf.public_key_pem(signing).decode()}
        )
        image = random.Random(5).randbytes(image_size)
        sha = hashlib.sha256(image).hexdigest()
        await call("POST", "/payloads", content=image)
        info = mf.ManifestInfo(
            2, vendor, klass, bytes.fromhex(sha), len(image), (f"{settings.public_http_url}/p/{sha}",)
        )
        man = await call(
            "POST",
            "/manifests",
            content=mf.build_envelope(info, signing),
            headers={"content-type": "application/cbor"},
        )
        names = [f"d{i:03d}" for i in range(devices)]
        rows = ["name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret"]
        rows += [f"{n},{vendor},{klass},,1,1.0,mqtt,," for n in names]
        imported = await call(
            "POST", "/devices/import", content="\n".join(rows) + "\n", headers={"content-type": "text/csv"}
        )
        registered = {d["name"]: d for d in imported["devices"]}
        configs = [
            DeviceConfig(
                name=name,
                tenant="acme",
                secret=bytes.fromhex(registered[name]["secret"]),
                vendor_id=vendor,
                class_id=klass,
                transport="mqtt",
                trust_anchors=[mf.public_key_pem(signing)],
                state_dir=state_dir,
                mqtt_url=broker_urls[i % len(broker_urls)],
                mqtt_username=registered[name]["mqtt_username"],
                mqtt_password=registered[name]["mqtt_password"],
                coap_url=settings.public_coap_url,
                installed_sequence=1,
                index=i,
            )
            for i, name in enumerate(names)
        ]
        stop = asyncio.Event()
        fleet = asyncio.create_task(
            run_fleet(configs, get_profile("none"), until=lambda _r: stop.is_set(), timeout=240)
        )
        stats: dict[str, Any] = {}
        try:
            # every device said hello (a report) through its broker before the campaign starts
            for _ in range(600):
                if server.ingest.ingested >= devices:
                    break
                await asyncio.sleep(0.2)
            c = await call("POST", "/campaigns", json={"name": "kit", "manifest_id": man["id"], "filter": ""})
            await call("POST", f"/campaigns/{c['id']}/start")
            for _ in range(900):
                stats = await call("GET", f"/campaigns/{c['id']}/stats")
                if stats["state"] == "completed":
                    break
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            report = await fleet
    return CampaignRun(stats, report, names)
