"""The server's MQTT link on a real broker: a burst of reports arrives whole through the read
buffer, and the batched PUBACKs settle exactly the reports that were acknowledged."""

from __future__ import annotations

import asyncio
import os
import time
from functools import partial

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fwcm import protocol
from fwcm.transport.broker import Broker, mosquitto_available, start_broker
from fwcm.transport.inbound import Inbound
from fwcm.transport.mqtt import MqttSettings, MqttTransport, make_client

REPORTS = 600


def publish_burst(url: str, count: int) -> None:
    """Publish ``count`` QoS 1 status messages from a stock paho client and wait for PUBACKs;
    every other one carries MQTT 5 properties."""
    settings = MqttSettings.from_url(url)
    c = make_client(settings, f"burst-{time.monotonic_ns()}", client_class=mqtt.Client)
    c.connect(settings.host, settings.port)
    c.loop_start()
    try:
        props = Properties(PacketTypes.PUBLISH)  # MQTT 5 properties the server skips unread
        props.MessageExpiryInterval = 3600
        props.UserProperty = ("trace", "x" * 200)
        infos = [
            c.publish(
                protocol.status_topic("acme", f"dev-{i:04d}"),
                f"report {i}".encode(),
                qos=1,
                properties=props if i % 2 else None,
            )
            for i in range(count)
        ]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


async def wait_for(received: list[Inbound], count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def test_burst_arrives_whole_and_only_acknowledged_reports_are_settled(broker: Broker) -> None:
    broker_url = broker.service_url  # the server's account: it may publish any device's status
    received: list[Inbound] = []
    # not shared: a persistent session, so what was not acknowledged comes back on reconnect
    first = MqttTransport(broker_url, "fwcm-server-acks", received.append, shared=False)
    await first.start()
    try:
        await asyncio.to_thread(publish_burst, broker_url, REPORTS)
        await wait_for(received, REPORTS)
        assert sorted(m.payload for m in received) == sorted(f"report {i}".encode() for i in range(REPORTS))
        assert all(m.kind == "status" and m.tenant == "acme" for m in received)
        settled = received[: REPORTS // 2]
        for m in settled:
            m.on_done(None)
        await asyncio.sleep(0.5)  # the collected PUBACKs go out when the loop turns
    finally:
        await first.stop()

    if os.environ.get("FWCM_BROKER") == "amqtt" or not mosquitto_available():
        pytest.skip("the embedded broker does not redeliver a persistent session's unacknowledged messages")
    again: list[Inbound] = []
    second = MqttTransport(broker_url, "fwcm-server-acks", again.append, shared=False)
    await second.start()
    try:
        await wait_for(again, REPORTS - len(settled), timeout=10)
        await asyncio.sleep(0.3)  # nothing more may come
        expected = {m.payload for m in received} - {m.payload for m in settled}
        assert sorted(m.payload for m in again) == sorted(expected)
        for m in again:
            m.on_done(None)
        await asyncio.sleep(0.3)
    finally:
        await second.stop()


def retained_notice(url: str, tenant: str, device: str, timeout: float = 10.0) -> bytes | None:
    """What a client subscribing now to the device's notice topic receives first."""
    settings = MqttSettings.from_url(url)
    got: list[bytes] = []
    c = make_client(settings, f"late-{time.monotonic_ns()}", client_class=mqtt.Client)
    c.on_message = lambda _c, _u, msg: got.append(msg.payload)
    c.connect(settings.host, settings.port)
    c.subscribe(protocol.notice_topic(tenant, device), qos=1)
    c.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        c.disconnect()
        c.loop_stop()
    return got[0] if got else None


async def test_a_notice_sent_is_retained_for_a_device_that_subscribes_later(broker: Broker) -> None:
    """The MQTT side of the notice-sender seam: the notice is rendered at once and published
    retained on the device's notice topic."""
    transport = MqttTransport(broker.service_url, "fwcm-server-notices", lambda _m: None, shared=False)
    await transport.start()
    rendered: list[bytes] = []

    def render() -> bytes:
        rendered.append(b"sealed notice %d" % len(rendered))
        return rendered[-1]

    try:
        assert transport.send_notice("acme", "late-1", render) is True
        assert rendered == [b"sealed notice 0"]
        got = await asyncio.to_thread(retained_notice, broker.service_url, "acme", "late-1")
        assert got == b"sealed notice 0"
    finally:
        await transport.stop()


def retained_notices(url: str, tenant: str, count: int, timeout: float = 30.0) -> dict[str, bytes]:
    """The retained notices a client subscribing now to every device of ``tenant`` receives."""
    settings = MqttSettings.from_url(url)
    got: dict[str, bytes] = {}
    c = make_client(settings, f"all-{time.monotonic_ns()}", client_class=mqtt.Client)
    c.on_message = lambda _c, _u, msg: got.__setitem__(msg.topic, msg.payload)
    c.connect(settings.host, settings.port)
    c.subscribe(protocol.notice_topic(tenant, "+"), qos=1)
    c.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        c.disconnect()
        c.loop_stop()
    return got


async def test_a_burst_beyond_the_in_flight_window_is_published_whole(broker: Broker) -> None:
    """More notices than the client keeps in flight (1,000) are queued and go out as PUBACKs come
    back: every one is delivered, none twice, none stuck waiting for room."""
    transport = MqttTransport(broker.service_url, "fwcm-server-burst", lambda _m: None, shared=False)
    await transport.start()
    n = 2500
    try:
        for i in range(n):
            transport.send_notice("burst", f"b-{i:04d}", lambda i=i: b"notice %d" % i)  # type: ignore[misc]
        deadline = time.monotonic() + 30
        while transport.client._out_messages and time.monotonic() < deadline:  # every PUBACK back
            await asyncio.sleep(0.05)
        assert not transport.client._out_messages, f"{len(transport.client._out_messages)} never acknowledged"
        got = await asyncio.to_thread(retained_notices, broker.service_url, "burst", n)
        assert got == {protocol.notice_topic("burst", f"b-{i:04d}"): b"notice %d" % i for i in range(n)}
    finally:
        await transport.stop()


def with_version(url: str, version: str) -> str:
    """``url`` speaking MQTT 3.1.1 when asked (brokers that speak only 3.1.1 already say so)."""
    if version == "5" or "v=311" in url:
        return url
    return url + ("&" if "?" in url else "?") + "v=311"


@pytest.mark.parametrize("version", ["5", "311"])
async def test_one_steps_notices_go_out_whole_in_one_write(broker: Broker, version: str) -> None:
    """``send_notices`` (a campaign step's notices, queued as one write) with more notices than the
    client keeps in flight: each is rendered once, delivered once with its own payload, and
    acknowledged, over MQTT 5 (an empty property block in each PUBLISH) and 3.1.1."""
    url = with_version(broker.service_url, version)
    transport = MqttTransport(url, f"fwcm-server-batch-{version}", lambda _m: None, shared=False)
    await transport.start()
    n = 1800
    rendered: list[int] = []

    def render(i: int) -> bytes:
        rendered.append(i)
        return b"notice %d" % i

    try:
        transport.send_notices([("batch", f"n-{i:04d}", partial(render, i)) for i in range(n)])
        assert rendered == list(range(n))
        assert transport.client._inflight_messages <= 1000  # the rest wait for room
        deadline = time.monotonic() + 30
        while transport.client._out_messages and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not transport.client._out_messages, f"{len(transport.client._out_messages)} never acknowledged"
        got = await asyncio.to_thread(retained_notices, url, "batch", n)
        assert got == {protocol.notice_topic("batch", f"n-{i:04d}"): b"notice %d" % i for i in range(n)}
    finally:
        await transport.stop()


async def test_notices_sent_while_the_broker_is_down_are_delivered_when_it_is_back() -> None:
    """A batch published into a lost connection is kept (QoS 1) and sent once the server is
    connected again: the broker restarted without persistence, so only the resend can deliver."""
    with start_broker() as b:
        transport = MqttTransport(b.service_url, "fwcm-server-down", lambda _m: None, shared=False)
        await transport.start()
        try:
            b.halt()
            transport.send_notices([("down", f"d-{i}", lambda i=i: b"kept %d" % i) for i in range(50)])  # type: ignore[misc]
            await asyncio.to_thread(b.restart)
            deadline = time.monotonic() + 30
            while (transport.client._out_messages or not transport.connected) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            got = await asyncio.to_thread(retained_notices, b.service_url, "down", 50)
            assert got == {protocol.notice_topic("down", f"d-{i}"): b"kept %d" % i for i in range(50)}
        finally:
            await transport.stop()
