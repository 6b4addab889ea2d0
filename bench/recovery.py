#!/usr/bin/env python3
"""How fast device links recover: prints figures, never asserts.

    bench/recovery.py [--devices 50] [--runs 3]

* ``coap moved``: CoAP devices come back from new addresses (a reboot, a NAT rebinding); a campaign
  starts; seconds until the last of them has its update notice.
* ``server restart``: the server stops and starts again (every CoAP observation is lost with it); a
  campaign starts as soon as it is up; seconds until the last CoAP device has its update notice.
* ``broker return``: Mosquitto stops for 3 s and starts again on the same port; seconds from the
  broker listening until the server's session is back.

Devices never re-observe by themselves in these runs (refresh one hour), so every figure is the
recovery mechanism's. Each figure is the median of ``--runs`` runs, with the spread.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from device_sim.agent import DeviceAgent, DeviceConfig
from device_sim.transports import SharedClients
from fwcm import manifest as mf
from fwcm.config import Settings
from fwcm.protocol import Report
from fwcm.server.app import Server
from fwcm.store import tenants
from fwcm.transport.broker import Broker, free_port, start_broker

VENDOR = mf.vendor_id_for_domain("bench.fwcm.example")
CLASS = mf.class_id_for(VENDOR, "sensor-v1")
NO_REFRESH = 3600.0
HEARD_TIMEOUT_S = 60.0


class Bench:
    """One server (SQLite), a broker, a tenant, and CoAP devices that note when they hear of a campaign."""

    def __init__(self, work: Path, broker: Broker, devices: int) -> None:
        self.work = work
        self.broker = broker
        self.n = devices
        self.settings = Settings(
            data_dir=work / "server",
            database_url=f"sqlite:///{work}/fwcm.sqlite",
            **broker.server_settings(),  # type: ignore[arg-type]
            http_port=free_port(),
            coap_port=free_port(socket.SOCK_DGRAM),
        )
        self.server = Server(self.settings, replica="bench")
        self.key = mf.generate_private_key("eddsa")
        self.heard: dict[str, float] = {}
        self.campaign = 0
        self.sequence = 1

    async def start(self) -> None:
        await self.server.start()
        with self.server.db.session() as s:
            _t, api_key = tenants.create_tenant(s, "acme", "Acme")
        self.http = httpx.AsyncClient(
            base_url=self.settings.public_http_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60
        )
        pem = mf.public_key_pem(self.key).decode()
        await self.call("POST", "/signers", json={"name": "rel", "public_key_pem": pem})
        rows = ["name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret"]
        rows += [f"c{i:04d},{VENDOR},{CLASS},,1,1.0,coap,," for i in range(self.n)]
        out = await self.call(
            "POST", "/devices/import", content="\n".join(rows) + "\n", headers={"content-type": "text/csv"}
        )
        self.secrets = {d["name"]: bytes.fromhex(d["secret"]) for d in out["devices"]}

    async def call(self, method: str, path: str, **kw: object) -> dict:  # type: ignore[type-arg]
        r = await self.http.request(method, "/api/v1" + path, **kw)  # type: ignore[arg-type]
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def agents(self, clients: SharedClients) -> list[DeviceAgent]:
        def heard(agent: DeviceAgent, r: Report) -> None:
            if r.campaign == self.campaign and agent.name not in self.heard:
                self.heard[agent.name] = time.monotonic()

        return [
            DeviceAgent(
                DeviceConfig(
                    name=name,
                    tenant="acme",
                    secret=secret,
                    vendor_id=VENDOR,
                    class_id=CLASS,
                    transport="coap",
                    trust_anchors=[mf.public_key_pem(self.key)],
                    state_dir=self.work / "devices",
                    coap_url=self.settings.public_coap_url,
                    installed_sequence=1,
                ),
                clients,
                coap_refresh=NO_REFRESH,
                listener=heard,
            )
            for name, secret in self.secrets.items()
        ]

    async def observed(self, agents: list[DeviceAgent]) -> None:
        """Until every agent's link is up (its observation registered)."""
        while not all(a.status.connected for a in agents):
            await asyncio.sleep(0.05)

    async def campaign_heard_by_all(self) -> float:
        """Start a campaign of a new image; seconds until every device reported on it."""
        self.sequence += 1
        image = bytes([self.sequence]) * 4096
        await self.call("POST", "/payloads", content=image)
        sha = hashlib.sha256(image).digest()
        info = mf.ManifestInfo(
            sequence=self.sequence,
            vendor_id=VENDOR,
            class_id=CLASS,
            image_digest=sha,
            image_size=len(image),
            uris=(f"{self.settings.public_coap_url}/p/{sha.hex()}",),
        )
        envelope = mf.build_envelope(info, self.key)
        man = await self.call(
            "POST", "/manifests", content=envelope, headers={"content-type": "application/cbor"}
        )
        c = await self.call("POST", "/campaigns", json={"name": "r", "manifest_id": man["id"]})
        self.campaign, self.heard = c["id"], {}
        started = time.monotonic()
        await self.call("POST", f"/campaigns/{c['id']}/start")
        while len(self.heard) < self.n:
            if time.monotonic() - started > HEARD_TIMEOUT_S:
                silent = sorted(set(self.secrets) - set(self.heard))
                raise TimeoutError(f"{len(silent)} devices never heard of campaign {c['id']}: {silent[:10]}")
            await asyncio.sleep(0.01)
        return max(self.heard.values()) - started


async def coap_moved(b: Bench) -> float:
    first = SharedClients(coap_sockets=8)
    agents = b.agents(first)
    tasks = [asyncio.create_task(a.run()) for a in agents]
    await b.observed(agents)
    for t in tasks:  # power cut: no goodbye, the server keeps the old observations
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await first.aclose()
    second = SharedClients(coap_sockets=8)
    agents = b.agents(second)
    tasks = [asyncio.create_task(a.run()) for a in agents]
    try:
        await b.observed(agents)
        return await b.campaign_heard_by_all()
    finally:
        for a in agents:
            a.stop()
        await asyncio.gather(*tasks)
        await second.aclose()


async def server_restart(b: Bench) -> float:
    clients = SharedClients(coap_sockets=8)
    agents = b.agents(clients)
    tasks = [asyncio.create_task(a.run()) for a in agents]
    try:
        await b.observed(agents)
        await asyncio.sleep(1.5)  # the addresses are stored every second
        await b.server.stop()
        b.server = Server(b.settings, replica="bench")
        await b.server.start()
        await b.http.aclose()
        b.http = httpx.AsyncClient(base_url=b.settings.public_http_url, headers=b.http.headers, timeout=60)
        return await b.campaign_heard_by_all()
    finally:
        for a in agents:
            a.stop()
        await asyncio.gather(*tasks)
        await clients.aclose()


async def broker_return(b: Bench) -> float:
    mqtt = b.server.mqtt
    assert mqtt is not None
    b.broker.halt()
    while mqtt.connected:
        await asyncio.sleep(0.01)
    await asyncio.sleep(3)
    b.broker.restart()
    back = time.monotonic()
    while not mqtt.connected:
        await asyncio.sleep(0.01)
    return time.monotonic() - back


def line(name: str, values: list[float]) -> None:
    print(
        f"{name:<16} median {statistics.median(values):6.2f} s   "
        f"min {min(values):6.2f}   max {max(values):6.2f}   ({len(values)} runs)",
        flush=True,
    )


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    figures: dict[str, list[float]] = {"coap moved": [], "server restart": [], "broker return": []}
    for _ in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="fwcm-recovery-"))
        broker = start_broker()
        b = Bench(work, broker, args.devices)
        try:
            await b.start()
            figures["coap moved"].append(await coap_moved(b))
            figures["server restart"].append(await server_restart(b))
            if b.broker.kind == "mosquitto":
                figures["broker return"].append(await broker_return(b))
        finally:
            await b.http.aclose()
            await b.server.stop()
            b.broker.stop()
    print(f"# recovery, {args.devices} CoAP devices", flush=True)
    for name, values in figures.items():
        if values:
            line(name, values)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    asyncio.run(main(ap.parse_args()))
