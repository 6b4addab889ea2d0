"""A campaign through a clustered broker: three nats-server nodes (MQTT on JetStream) on loopback,
the server connected to node 1, the simulated devices spread over all three nodes."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_sim.agent import DeviceConfig
from device_sim.faults import get_profile
from device_sim.fleet import run_fleet
from fwcm import manifest as mf
from fwcm.config import Settings
from fwcm.server.app import Server
from fwcm.store import repo
from fwcm.transport.broker import BrokerCluster, free_port, nats_binary, start_nats_cluster

pytestmark = pytest.mark.skipif(
    nats_binary() is None, reason="nats-server is not installed (Debian: apt-get install nats-server)"
)

VENDOR = mf.vendor_id_for_domain("cluster.fwcm.example")
CLASS = mf.class_id_for(VENDOR, "sensor-v1")
DEVICES = 30


@pytest.fixture(scope="module")
def cluster() -> Iterator[BrokerCluster]:
    with start_nats_cluster(3) as c:
        yield c


@pytest.fixture
async def server(tmp_path: Path, cluster: BrokerCluster) -> AsyncIterator[Server]:
    settings = Settings(
        data_dir=tmp_path / "server",
        mqtt_url=cluster.nodes[0].url,
        http_port=free_port(),
        coap_port=free_port(socket.SOCK_DGRAM),
    )
    srv = Server(settings, replica="cluster")
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def test_campaign_completes_with_devices_on_every_node(
    server: Server, cluster: BrokerCluster, tmp_path: Path
) -> None:
    settings = server.settings
    with server.db.session() as s:
        _t, key = repo.create_tenant(s, "acme", "Acme")
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
        image = random.Random(5).randbytes(16 * 1024)
        sha = hashlib.sha256(image).hexdigest()
        await call("POST", "/payloads", content=image)
        info = mf.ManifestInfo(
            2, VENDOR, CLASS, bytes.fromhex(sha), len(image), (f"{settings.public_http_url}/p/{sha}",)
        )
        man = await call(
            "POST",
            "/manifests",
            content=mf.build_envelope(info, signing),
            headers={"content-type": "application/cbor"},
        )
        names = [f"d{i:03d}" for i in range(DEVICES)]
        rows = ["name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret"]
        rows += [f"{n},{VENDOR},{CLASS},,1,1.0,mqtt,," for n in names]
        imported = await call(
            "POST", "/devices/import", content="\n".join(rows) + "\n", headers={"content-type": "text/csv"}
        )
        secrets = {d["name"]: bytes.fromhex(d["secret"]) for d in imported["devices"]}
        configs = [
            DeviceConfig(
                name=name,
                tenant="acme",
                secret=secrets[name],
                vendor_id=VENDOR,
                class_id=CLASS,
                transport="mqtt",
                trust_anchors=[mf.public_key_pem(signing)],
                state_dir=tmp_path / "devices",
                mqtt_url=cluster.nodes[i % len(cluster.nodes)].url,  # spread over the nodes
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
        try:
            # every device said hello (a report) through its node before the campaign starts
            for _ in range(600):
                if server.ingest.ingested >= DEVICES:
                    break
                await asyncio.sleep(0.2)
            c = await call(
                "POST", "/campaigns", json={"name": "cluster", "manifest_id": man["id"], "filter": ""}
            )
            await call("POST", f"/campaigns/{c['id']}/start")
            stats: dict[str, Any] = {}
            for _ in range(900):  # bounded: up to ~3 minutes on a loaded machine
                stats = await call("GET", f"/campaigns/{c['id']}/stats")
                if stats["state"] == "completed":
                    break
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            report = await fleet
    assert stats["state"] == "completed", stats
    assert stats["counts"]["succeeded"] == DEVICES and stats["total"] == DEVICES, stats
    assert all(report.devices[n].installed_sequence == 2 for n in names)
