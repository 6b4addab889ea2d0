"""A decommissioned device, end to end with a real broker: its broker account and its retained
notice are gone, its deployment is withdrawn, and whatever still arrives from it is refused and
counted, while the other devices of the campaign carry on."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
from collections.abc import Awaitable, Callable

import paho.mqtt.client as mqtt
import pytest

from fwcm import protocol
from fwcm.protocol import LwState, Report, Result
from fwcm.server import metrics
from fwcm.transport.accounts import Credentials
from fwcm.transport.mqtt import MqttSettings, make_client

from .conftest import Env, firmware

pytestmark = pytest.mark.timeout(120)

SOON_S = 15.0


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = SOON_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.1)


def _connected(settings: MqttSettings, client_id: str) -> mqtt.Client:
    client = make_client(settings, client_id)
    client.connect(settings.host, settings.port)
    client.loop_start()
    return client


def retained(env: Env, topics: list[str], last: str) -> dict[str, bytes]:
    """The retained messages of ``topics``, read with the service account: the broker sends them in
    the order subscribed, so once ``last`` (known to be retained) arrived, every other one has."""
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    client = make_client(MqttSettings.from_url(env.settings.mqtt_url), "test-retained")
    client.on_message = lambda _c, _u, msg: got.put(msg)
    client.on_connect = lambda c, *_a: c.subscribe([(t, 1) for t in topics])
    settings = MqttSettings.from_url(env.settings.mqtt_url)
    client.connect(settings.host, settings.port)
    client.loop_start()
    try:
        out: dict[str, bytes] = {}
        while last not in out:
            msg = got.get(timeout=SOON_S)
            out[msg.topic] = msg.payload
        return out
    finally:
        client.loop_stop()
        client.disconnect()


def hello(secret: bytes, device: str, seq: int, installed: int) -> bytes:
    report = Report(
        device=device,
        campaign=0,
        attempt=0,
        seq=seq,
        state=LwState.IDLE,
        result=Result.INITIAL,
        installed_sequence=installed,
    )
    return protocol.encode_report(secret, report)


async def test_a_decommissioned_device_loses_access_and_notices_while_others_go_on(env: Env) -> None:
    secrets = await env.devices([("old", "mqtt"), ("kept", "mqtt")])
    for name in ("old", "kept"):
        await env.admitted(name)
    man = await env.manifest(firmware())
    cid = await env.campaign(man["id"])
    await env.call("POST", f"/campaigns/{cid}/start")

    async def both_notified() -> bool:
        stats = await env.call("GET", f"/campaigns/{cid}/stats")
        return bool(stats["counts"]["notified"] == 2)

    await until("both devices notified", both_notified)
    old_topic, kept_topic = (protocol.notice_topic("acme", n) for n in ("old", "kept"))
    before = await asyncio.to_thread(retained, env, [old_topic, kept_topic], kept_topic)
    assert before[old_topic] and before[kept_topic]

    out = await env.call("POST", "/devices/old/decommission")
    assert out["withdrawn"] == 1

    # its broker account goes, the other device's stays
    old_account = Credentials(*env.mqtt_accounts["old"])

    async def old_refused() -> bool:
        return not await asyncio.to_thread(env.broker.accepts, old_account)

    await until("the broker refuses the decommissioned device", old_refused)
    assert await asyncio.to_thread(env.broker.accepts, Credentials(*env.mqtt_accounts["kept"]))

    # its retained notice is withdrawn; the other's is still there
    after = await asyncio.to_thread(retained, env, [old_topic, kept_topic], kept_topic)
    assert old_topic not in after or after[old_topic] == b""
    assert after[kept_topic] == before[kept_topic]

    # a message that still arrives in its name (sent before, or by a session of the old account)
    # is refused and counted
    rejected = metrics.REJECTED.labels("mqtt", "decommissioned")
    counted = rejected._value.get()
    service = await asyncio.to_thread(_connected, MqttSettings.from_url(env.settings.mqtt_url), "test-late")
    try:
        service.publish(protocol.status_topic("acme", "old"), hello(secrets["old"], "old", 1, 7), qos=1)

        async def refused() -> bool:
            return bool(rejected._value.get() > counted)

        await until("the decommissioned device's hello refused", refused)
    finally:
        service.loop_stop()
        service.disconnect()
    assert (await env.call("GET", "/devices/old"))["sequence"] == 1

    # the other device reports as before
    user, password = env.mqtt_accounts["kept"]
    device = MqttSettings.from_url(env.broker.url)
    device = dataclasses.replace(device, username=user, password=password, version=4)
    kept = await asyncio.to_thread(_connected, device, user)
    try:
        kept.publish(protocol.status_topic("acme", "kept"), hello(secrets["kept"], "kept", 1, 7), qos=1)

        async def kept_hello_applied() -> bool:
            return bool((await env.call("GET", "/devices/kept"))["sequence"] == 7)

        await until("the other device's hello applied", kept_hello_applied)
    finally:
        kept.loop_stop()
        kept.disconnect()
    states = {d["device"]: d["state"] for d in (await env.call("GET", f"/campaigns/{cid}/devices"))["items"]}
    assert states == {"old": "cancelled", "kept": "notified"}
