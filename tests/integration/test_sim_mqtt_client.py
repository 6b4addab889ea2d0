"""The simulator's device MQTT client against real brokers (Mosquitto and the embedded amqtt):
it logs in with a device account, gets its retained and queued notices, publishes with QoS 1
until acknowledged, leaves a last will on a power cut and none on a clean disconnect."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from device_sim.mqtt_client import DeviceMqtt, MqttError, Will
from fwcm import protocol
from fwcm.transport.accounts import Credentials, device_credentials
from fwcm.transport.broker import Broker, mosquitto_available, start_amqtt, start_mosquitto

pytestmark = pytest.mark.timeout(120)

TENANT = "acme"


def creds(name: str) -> Credentials:
    return device_credentials(name.encode().ljust(32, b"\0"), TENANT, name)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("mosquitto", marks=pytest.mark.skipif(not mosquitto_available(), reason="no Mosquitto")),
        "amqtt",
    ],
)
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    with start_mosquitto() if request.param == "mosquitto" else start_amqtt() as b:
        b.admit([creds("d1"), creds("d2")])
        yield b


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.changed = asyncio.Event()

    def __call__(self, topic: str, payload: bytes) -> None:
        self.messages.append((topic, payload))
        self.changed.set()

    async def until(self, message: tuple[str, bytes], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while message not in self.messages:
                self.changed.clear()
                await self.changed.wait()


async def device(broker: Broker, name: str, inbox: Inbox, *, will: bool = True) -> DeviceMqtt:
    account = creds(name)
    presence = protocol.presence_topic(TENANT, name)
    return await DeviceMqtt.connect(
        "127.0.0.1",
        broker.port,
        inbox,
        client_id=f"{TENANT}.{name}",
        username=account.username,
        password=account.password,
        will=Will(presence, b"0") if will else None,
    )


async def service(broker: Broker, inbox: Inbox) -> DeviceMqtt:
    assert broker.service is not None
    return await DeviceMqtt.connect(
        "127.0.0.1",
        broker.service_port or broker.port,
        inbox,
        client_id="svc-test",
        username=broker.service.username,
        password=broker.service.password,
        clean_session=True,
    )


async def test_notices_reports_and_the_last_will(broker: Broker) -> None:
    seen = Inbox()
    svc = await service(broker, seen)
    await svc.subscribe(protocol.status_topic(TENANT, "+"))
    await svc.subscribe(protocol.presence_topic(TENANT, "+"))
    notice_topic = protocol.notice_topic(TENANT, "d1")
    await svc.publish(notice_topic, b"retained notice", retain=True)

    got = Inbox()
    d1 = await device(broker, "d1", got)
    await d1.subscribe(notice_topic)
    await got.until((notice_topic, b"retained notice"))  # retained: delivered on subscribe
    await d1.publish(protocol.status_topic(TENANT, "d1"), b"report 1")  # returns on PUBACK
    await seen.until((protocol.status_topic(TENANT, "d1"), b"report 1"))

    await svc.publish(notice_topic, b"second notice", retain=True)
    await got.until((notice_topic, b"second notice"))

    d1.abort()  # a power cut: the broker publishes the will
    await asyncio.wait_for(asyncio.shield(d1.closed), 5)
    await seen.until((protocol.presence_topic(TENANT, "d1"), b"0"))
    await svc.publish(notice_topic, b"", retain=True)
    await svc.disconnect()


async def test_a_clean_disconnect_leaves_no_will(broker: Broker) -> None:
    seen = Inbox()
    svc = await service(broker, seen)
    presence = protocol.presence_topic(TENANT, "d2")
    await svc.subscribe(presence)
    d2 = await device(broker, "d2", Inbox())
    await d2.publish(presence, b"1", retain=True)
    await seen.until((presence, b"1"))
    await d2.disconnect()
    assert d2.closed.done()
    await asyncio.sleep(0.5)
    assert (presence, b"0") not in seen.messages
    await svc.publish(presence, b"", retain=True)
    await svc.disconnect()


async def test_a_wrong_password_is_refused(broker: Broker) -> None:
    with pytest.raises(MqttError):
        await DeviceMqtt.connect(
            "127.0.0.1",
            broker.port,
            Inbox(),
            client_id=f"{TENANT}.d1",
            username=creds("d1").username,
            password="not-the-password",
            timeout=5,
        )


async def test_a_publish_on_a_lost_connection_fails_fast(broker: Broker) -> None:
    d1 = await device(broker, "d1", Inbox(), will=False)
    d1.abort()
    await asyncio.wait_for(asyncio.shield(d1.closed), 5)
    with pytest.raises(MqttError):
        await d1.publish(protocol.status_topic(TENANT, "d1"), b"late", timeout=2)
