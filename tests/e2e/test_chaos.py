"""One campaign of a few hundred devices over MQTT and CoAP lives through, in turn, a kill -9 of the
server, a broker restart and a PostgreSQL restart, and completes with every device counted once
and none left in progress."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from device_sim.faults import get_profile
from device_sim.fleet import run_fleet
from fwcm import manifest as mf
from fwcm.config import Settings
from fwcm.transport.broker import free_port, start_mosquitto

from .conftest import Env, firmware
from .test_campaign import configs
from .test_crash import ServerProcess, wait_http

if TYPE_CHECKING:
    from conftest import PrivatePostgres  # the fixture's type, from tests/conftest.py

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

DEVICES = 240
IN_PROGRESS = ("notified", "downloading", "downloaded", "installing")


async def stats_when(
    http: httpx.AsyncClient, cid: int, ok: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll the campaign until ``ok(stats)``; the API may answer 503 while the database is away."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 240
    last: dict[str, Any] = {}
    while True:
        try:
            r = await http.get(f"/api/v1/campaigns/{cid}/stats")
            if r.status_code == 200:
                last = r.json()
                if ok(last):
                    return last
            else:
                assert r.status_code == 503, r.text  # an outage is a clean 503, nothing else
        except httpx.TransportError:
            pass  # the server is being restarted
        assert loop.time() < deadline, f"campaign stuck: {last}"
        await asyncio.sleep(0.25)


def succeeded_at_least(n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda s: s["counts"]["succeeded"] >= n


@pytest.mark.skipif(
    not (Path("/usr/sbin/mosquitto").exists()), reason="restarts Mosquitto (installed by .ci/run)"
)
async def test_campaign_survives_server_kill_broker_restart_and_database_restart(
    tmp_path: Path, private_postgres: PrivatePostgres
) -> None:
    broker = start_mosquitto()
    env = dict(os.environ)
    env.update(
        FWCM_DATA_DIR=str(tmp_path / "server"),
        FWCM_DATABASE_URL=private_postgres.url,
        **broker.server_env(),
        FWCM_HTTP_BIND=f"127.0.0.1:{free_port()}",
        FWCM_COAP_BIND=f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
    )
    out = subprocess.run(
        [sys.executable, "-m", "fwcm.cli", "admin", "tenant-create", "acme", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    key = json.loads(out.stdout.strip().splitlines()[-1])["api_key"]
    base = "http://" + env["FWCM_HTTP_BIND"]
    server = ServerProcess(env, tmp_path / "server.log")
    server.start()
    http = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    stop = asyncio.Event()
    fleet = None
    try:
        await wait_http(base)
        settings = Settings(
            http_host="127.0.0.1",
            http_port=int(env["FWCM_HTTP_BIND"].split(":")[1]),
            coap_port=int(env["FWCM_COAP_BIND"].split(":")[1]),
            mqtt_url=broker.url,
            data_dir=tmp_path / "unused",
        )
        signing_key = mf.generate_private_key("eddsa")
        e = Env(server=None, settings=settings, broker=broker, http=http, key=key, signing_key=signing_key)  # type: ignore[arg-type]
        await e.call(
            "POST",
            "/signers",
            json={"name": "rel", "public_key_pem": mf.public_key_pem(signing_key).decode()},
        )
        man = await e.manifest(firmware(16 * 1024))
        transports = {f"d{i:03d}": ("mqtt" if i % 2 else "coap") for i in range(DEVICES)}
        secrets = await e.devices(list(transports.items()))
        cid = await e.campaign(man["id"], policy={"rate_per_minute": 480})
        fleet = asyncio.create_task(
            run_fleet(
                configs(e, secrets, transports, tmp_path), get_profile("none"), until=lambda _r: stop.is_set()
            )
        )
        await e.call("POST", f"/campaigns/{cid}/start")

        await stats_when(http, cid, succeeded_at_least(20))
        server.kill9()
        await asyncio.sleep(2)  # devices keep working and reporting into the void (CoAP) or the broker
        server.start()
        await wait_http(base)

        await stats_when(http, cid, succeeded_at_least(80))
        broker.halt()
        await asyncio.sleep(2)
        broker.restart()

        await stats_when(http, cid, succeeded_at_least(140))
        private_postgres.stop()
        await asyncio.sleep(3)
        private_postgres.start()

        final = await stats_when(
            http, cid, lambda s: s["state"] == "completed" and not any(s["counts"][k] for k in IN_PROGRESS)
        )
        stop.set()
        report = await fleet
        assert final["total"] == DEVICES and sum(final["counts"].values()) == DEVICES
        assert final["counts"]["succeeded"] == DEVICES, final
        devices = (await e.call("GET", f"/campaigns/{cid}/devices", params={"limit": 1000}))["items"]
        assert sorted(d["device"] for d in devices) == sorted(transports)  # each device exactly once
        assert all(s.installed_sequence == 2 for s in report.devices.values())
    finally:
        stop.set()
        if fleet is not None and not fleet.done():
            await asyncio.wait_for(fleet, 60)
        await http.aclose()
        server.stop()
        broker.stop()
