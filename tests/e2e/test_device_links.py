"""CoAP device links on a real server: who may observe a notice, and how a device that moved, or a
server that restarted, gets notices again without waiting for the device's periodic refresh."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiocoap
import httpx
import pytest
from aiocoap.numbers.codes import Code

from device_sim.agent import DeviceAgent
from device_sim.transports import CoapLink, SharedClients
from fwcm import protocol
from fwcm.config import Settings
from fwcm.devices import validate_device
from fwcm.server.app import Server
from fwcm.store import devices, tenants
from fwcm.store.models import Device
from fwcm.transport.broker import Broker, free_port

from .conftest import CLASS, VENDOR, Env, firmware
from .test_campaign import configs

if TYPE_CHECKING:
    from conftest import PrivatePostgres  # the fixture's type, from tests/conftest.py

pytestmark = pytest.mark.timeout(180)

NO_REFRESH = 3600.0
"""Devices in these tests never re-observe by themselves: only the mechanism under test can help."""


async def until(predicate, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def aiocoap_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def coap_get(ctx: aiocoap.Context, uri: str, *, observe: bool = False) -> aiocoap.Message:
    msg = aiocoap.Message(code=Code.GET, uri=uri, observe=0 if observe else None)
    return await asyncio.wait_for(ctx.request(msg).response, 15)


@pytest.fixture
async def client() -> AsyncIterator[aiocoap.Context]:
    ctx = await aiocoap.Context.create_client_context()
    yield ctx
    await ctx.shutdown()


async def test_only_the_device_reads_its_notice_and_strangers_cost_no_observation(
    env: Env, client: aiocoap.Context, caplog: pytest.LogCaptureFixture
) -> None:
    secrets = await env.devices([("c1", "coap"), ("c2", "coap")])
    man = await env.manifest(firmware(4096))
    cid = await env.campaign(man["id"])
    await env.call("POST", f"/campaigns/{cid}/start")
    base = f"{env.settings.public_coap_url}/n/acme"
    own = protocol.device_password(secrets["c1"], "acme", "c1")

    for query in ("", "?k=wrong", f"?k={protocol.device_password(secrets['c2'], 'acme', 'c2')}"):
        assert (await coap_get(client, f"{base}/c1{query}")).code == Code.UNAUTHORIZED
        assert (await coap_get(client, f"{base}/c1{query}", observe=True)).code == Code.UNAUTHORIZED
    for i in range(300):  # observations of devices that do not exist
        r = await coap_get(client, f"{base}/ghost{i}?k={own}", observe=True)
        assert r.code == Code.UNAUTHORIZED
    assert env.server.coap is not None and env.server.coap.notices.observer_count == 0

    ok = await coap_get(client, f"{base}/c1?k={own}")
    assert ok.code == Code.CONTENT
    notice = protocol.decode_notice(ok.payload, secrets["c1"])
    assert (notice.kind, notice.campaign, notice.device) == (protocol.NoticeKind.UPDATE, cid, "c1")
    assert aiocoap_errors(caplog) == []


async def test_a_device_back_from_a_new_address_gets_its_notices(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    secrets = await env.devices([("moved", "coap"), ("stays", "coap")])
    uri = env.settings.public_coap_url
    received: dict[str, list[bytes]] = {"moved": [], "new": [], "stays": []}

    def link(clients: SharedClients, name: str) -> CoapLink:
        password = protocol.device_password(secrets[name], "acme", name)
        return CoapLink(clients, uri, "acme", name, password=password, refresh=NO_REFRESH)

    before, other = SharedClients(coap_sockets=1), SharedClients(coap_sockets=1)
    old = link(before, "moved")
    await old.open(received["moved"].append)
    stays = link(other, "stays")
    await stays.open(received["stays"].append)
    await old.close(graceful=False)  # a reboot: the old socket is gone, the server still has the observation
    await before.aclose()
    after = SharedClients(coap_sockets=1)
    new = link(after, "moved")
    await new.open(received["new"].append)
    try:
        assert env.server.coap is not None and env.server.coap.notices.observer_count == 2
        man = await env.manifest(firmware(4096))
        cid = await env.campaign(man["id"])
        await env.call("POST", f"/campaigns/{cid}/start")

        def updated(which: str) -> bool:
            name = "moved" if which == "new" else which
            notices = [protocol.decode_notice(p, secrets[name]) for p in received[which]]
            return any(n.campaign == cid and n.kind == protocol.NoticeKind.UPDATE for n in notices)

        await until(lambda: updated("new") and updated("stays"), "both devices' update notices")
    finally:
        for lk in (new, stays):
            await lk.close(graceful=True)
        await after.aclose()
        await other.aclose()
    assert aiocoap_errors(caplog) == []


async def test_a_restarted_server_pushes_notices_to_coap_devices(env: Env, tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(6)]
    secrets = await env.devices([(n, "coap") for n in names])
    clients = SharedClients(coap_sockets=2)
    agents = [
        DeviceAgent(cfg, clients, coap_refresh=NO_REFRESH)
        for cfg in configs(env, secrets, dict.fromkeys(names, "coap"), tmp_path)
    ]
    tasks = [asyncio.create_task(a.run()) for a in agents]
    server = env.server
    try:
        assert server.coap is not None
        await until(lambda: server.coap is not None and server.coap.notices.observer_count == 6, "observers")

        def stored() -> int:
            with server.db.read() as s:
                return s.query(Device).filter(Device.coap_address.is_not(None)).count()

        await until(lambda: stored() == 6, "the devices' addresses to be stored")
        await server.stop()  # every observation is gone with it
        server = env.server = Server(env.settings, replica="test")
        await server.start()
        env.http = httpx.AsyncClient(
            base_url=env.settings.public_http_url, headers=dict(env.http.headers), timeout=30
        )
        man = await env.manifest(firmware(8192, seed=4))
        cid = await env.campaign(man["id"])
        await env.call("POST", f"/campaigns/{cid}/start")
        await until(lambda: all(a.status.installed_sequence == 2 for a in agents), "every device updated", 60)
        assert server.coap is not None and server.coap.pushed >= 6
    finally:
        for a in agents:
            a.stop()
        await asyncio.gather(*tasks)
        await clients.aclose()


async def test_device_resources_answer_503_while_the_database_is_down(
    tmp_path: Path, broker: Broker, private_postgres: PrivatePostgres, client: aiocoap.Context
) -> None:
    settings = Settings(
        data_dir=tmp_path / "server",
        database_url=private_postgres.url,
        **broker.server_settings(),  # type: ignore[arg-type]
        http_port=free_port(),
        coap_port=free_port(socket.SOCK_DGRAM),
    )
    server = Server(settings, replica="test")
    await server.start()
    try:
        with server.db.session() as s:
            tenant, _key = tenants.create_tenant(s, "acme", "Acme")
            device = devices.register_device(
                s, tenant.id, validate_device("c1", str(VENDOR), str(CLASS), transport="coap")
            )
            secret = device.secret
        uri = f"{settings.public_coap_url}/n/acme/c1?k={protocol.device_password(secret, 'acme', 'c1')}"
        assert (await coap_get(client, uri)).code == Code.CONTENT
        server.ingest.keys = type(server.ingest.keys)(server.db)  # forget what it knew: ask the database
        private_postgres.stop()
        down = await coap_get(client, uri)
        assert down.code == Code.SERVICE_UNAVAILABLE and down.opt.max_age
        payload = f"{settings.public_coap_url}/p/{'0' * 64}"
        assert (await coap_get(client, payload)).code == Code.SERVICE_UNAVAILABLE
        private_postgres.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (r := await coap_get(client, uri)).code != Code.CONTENT:  # the pool reconnects
            assert loop.time() < deadline, r
            await asyncio.sleep(0.2)
    finally:
        await server.stop()


async def test_a_second_server_refuses_to_start_and_leaves_the_live_one_alone(env: Env) -> None:
    assert env.server.mqtt is not None and env.server.mqtt.connected
    disconnects = []
    env.server.mqtt.client.on_disconnect = lambda *a: disconnects.append(a)  # type: ignore[assignment]
    second = Server(env.settings, replica="test")
    with pytest.raises(RuntimeError, match="in use"):
        await second.start()
    assert second.mqtt is None  # it never spoke to the broker
    await asyncio.sleep(1.0)
    assert env.server.mqtt.connected and disconnects == []


async def test_the_server_reconnects_when_the_broker_comes_back(env: Env, tmp_path: Path) -> None:
    if env.broker.kind != "mosquitto":
        pytest.skip("restarts Mosquitto on the same port")
    secrets = await env.devices([("m1", "mqtt")])
    mqtt = env.server.mqtt
    assert mqtt is not None and mqtt.connected
    env.broker.halt()
    await until(lambda: not mqtt.connected, "the server to notice the broker is gone")
    env.broker.restart()
    await until(lambda: mqtt.connected, "the server to reconnect")
    agent = DeviceAgent(configs(env, secrets, {"m1": "mqtt"}, tmp_path)[0], SharedClients())
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: env.server.ingest.ingested > 0, "the device's hello to be ingested")
    finally:
        agent.stop()
        await task
