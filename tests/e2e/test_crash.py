"""kill -9 of the server mid-campaign: a restarted server finishes the campaign from the database,
every device is counted once, and no acknowledged report is lost."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from device_sim.faults import get_profile
from device_sim.fleet import run_fleet
from fwcm import manifest as mf
from fwcm.transport.broker import Broker, free_port

from .conftest import Env, firmware
from .test_campaign import configs


class ServerProcess:
    """``fwcm server`` as a child process with a fixed replica name."""

    def __init__(self, env: dict[str, str], log: Path, name: str = "r1") -> None:
        self.env = env
        self.log = log
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fwcm.cli", "server", "--replica", self.name],
                env=self.env,
                stdout=out,
                stderr=out,
            )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def server_env(tmp_path: Path, broker: Broker, database_url: str) -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    env.update(
        FWCM_DATA_DIR=str(tmp_path / "server"),
        FWCM_DATABASE_URL=database_url,
        **broker.server_env(),
        FWCM_HTTP_BIND=f"127.0.0.1:{free_port()}",
        FWCM_COAP_BIND=f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
    )
    yield env


async def wait_http(base: str, timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient() as c:
        while True:
            try:
                if (await c.get(base + "/api/v1/openapi.json")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert loop.time() < deadline, "server did not come up"
            await asyncio.sleep(0.2)


async def test_kill_9_mid_campaign(tmp_path: Path, broker: Broker, server_env: dict[str, str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fwcm.cli", "admin", "tenant-create", "acme", "--json"],
        env=server_env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    key = json.loads(out.stdout.strip().splitlines()[-1])["api_key"]
    base = "http://" + server_env["FWCM_HTTP_BIND"]
    server = ServerProcess(server_env, tmp_path / "server.log")
    server.start()
    signing_key = mf.generate_private_key("eddsa")
    http = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    fleet_task = None
    stop = asyncio.Event()
    try:
        await wait_http(base)
        from fwcm.config import Settings

        settings = Settings(
            http_host="127.0.0.1",
            http_port=int(server_env["FWCM_HTTP_BIND"].split(":")[1]),
            coap_port=int(server_env["FWCM_COAP_BIND"].split(":")[1]),
            mqtt_url=broker.url,
            data_dir=tmp_path / "unused",
        )
        env = Env(
            server=None,
            settings=settings,
            broker=broker,
            http=http,
            key=key,  # type: ignore[arg-type]
            signing_key=signing_key,
        )
        await env.call(
            "POST",
            "/signers",
            json={"name": "rel", "public_key_pem": mf.public_key_pem(signing_key).decode()},
        )
        man = await env.manifest(firmware(96 * 1024))
        n = 40
        transports = {f"d{i:03d}": ("mqtt" if i % 2 else "coap") for i in range(n)}
        secrets = await env.devices(list(transports.items()))
        cid = await env.campaign(man["id"], policy={"rate_per_minute": 2400})
        fleet_task = asyncio.create_task(
            run_fleet(
                configs(env, secrets, transports, tmp_path),
                get_profile("slow"),
                until=lambda _r: stop.is_set(),
                timeout=240,
            )
        )
        await env.call("POST", f"/campaigns/{cid}/start")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while True:  # kill once some, but not all, devices have succeeded
            stats = await env.call("GET", f"/campaigns/{cid}/stats")
            if 0 < stats["counts"]["succeeded"] < n // 2:
                break
            assert stats["counts"]["succeeded"] < n // 2, "campaign went too fast to interrupt"
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        server.kill9()
        await asyncio.sleep(2)  # devices keep working and reporting into the void (CoAP) or the broker
        server.start()
        await wait_http(base)
        while True:
            stats = await env.call("GET", f"/campaigns/{cid}/stats")
            if stats["state"] == "completed":
                break
            assert loop.time() < deadline + 120, stats
            await asyncio.sleep(0.2)
        stop.set()
        report = await fleet_task
        assert stats["total"] == n and sum(stats["counts"].values()) == n
        assert stats["counts"]["succeeded"] == n, stats
        devices = (await env.call("GET", f"/campaigns/{cid}/devices", params={"limit": 100}))["items"]
        assert sorted(d["device"] for d in devices) == sorted(transports)  # each device once
        assert all(d["attempt"] == 1 for d in devices)  # no device was notified twice as a new attempt
        assert all(s.installed_sequence == 2 for s in report.devices.values())
    finally:
        stop.set()
        if fleet_task is not None and not fleet_task.done():
            await asyncio.wait_for(fleet_task, 30)
        await http.aclose()
        server.stop()
