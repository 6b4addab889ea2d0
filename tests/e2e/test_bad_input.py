"""Hostile and broken device messages are refused, counted, and do not disturb anyone else."""

from __future__ import annotations

import asyncio
import socket

import aiocoap
import cbor2
import paho.mqtt.client as mqtt
import pytest
from aiocoap.numbers.codes import Code
from paho.mqtt.enums import CallbackAPIVersion

from fwcm import protocol
from fwcm.protocol import LwState, Report, Result
from fwcm.server.metrics import REGISTRY
from fwcm.transport.mqtt import MqttSettings

from .conftest import Env


def rejected(transport: str, reason: str) -> float:
    return (
        REGISTRY.get_sample_value("fwcm_messages_rejected_total", {"transport": transport, "reason": reason})
        or 0
    )


def hello(device: str, seq: int, installed: int) -> Report:
    return Report(
        device=device,
        campaign=0,
        attempt=0,
        seq=seq,
        state=LwState.IDLE,
        result=Result.INITIAL,
        installed_sequence=installed,
    )


async def device_sequence(env: Env, name: str) -> int:
    return int((await env.call("GET", f"/devices/{name}"))["sequence"])


async def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def publisher(env: Env) -> mqtt.Client:
    """A client that may publish on every device's topics: the broker's ACLs stop devices doing so,
    so this stands for messages that got past them (or a broker without ACLs)."""
    s = MqttSettings.from_url(env.broker.service_url)
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id="hostile",
        protocol=mqtt.MQTTv5 if s.version == 5 else mqtt.MQTTv311,
    )
    if s.username:
        c.username_pw_set(s.username, s.password)
    c.connect(s.host, s.port)
    c.loop_start()
    return c


async def test_mqtt_bad_messages_are_dropped_and_counted(env: Env) -> None:
    secrets = await env.devices([("good", "mqtt"), ("victim", "mqtt")])
    topic = protocol.status_topic("acme", "good")
    cases = {
        "cbor": (topic, b"\xff\x00garbage"),
        "shape": (topic, cbor2.dumps({"not": "a frame"})),
        "oversized": (topic, b"\x00" * (protocol.MAX_REPORT_BYTES + 1)),
        "unknown_device": (
            protocol.status_topic("acme", "ghost"),
            protocol.encode_report(b"k" * 32, hello("ghost", 1, 9)),
        ),
        # "good" seals a report with its own key but publishes it as "victim"
        "forbidden": (
            protocol.status_topic("acme", "victim"),
            protocol.encode_report(secrets["good"], hello("good", 1, 9)),
        ),
        # a frame naming "victim" but keyed with the wrong secret
        "mac": (
            protocol.status_topic("acme", "victim"),
            protocol.encode_report(secrets["good"], hello("victim", 1, 9)),
        ),
        # another tenant's topic for a device of ours
        "unknown_device ": (
            protocol.status_topic("other", "good"),
            protocol.encode_report(secrets["good"], hello("good", 1, 9)),
        ),
    }
    before = {r: rejected("mqtt", r.strip()) for r in cases}
    client = publisher(env)
    try:
        for topic_, payload in cases.values():
            client.publish(topic_, payload, qos=1).wait_for_publish(5)
        # a valid report afterwards is still applied
        client.publish(topic, protocol.encode_report(secrets["good"], hello("good", 1, 5)), qos=1)

        async def applied() -> bool:
            return await device_sequence(env, "good") == 5

        await wait_for(applied)
    finally:
        client.loop_stop()
        client.disconnect()
    expected_increase: dict[str, int] = {}
    for r in cases:
        expected_increase[r.strip()] = expected_increase.get(r.strip(), 0) + 1
    for reason, n in expected_increase.items():
        assert rejected("mqtt", reason) - before.get(reason, before.get(reason + " ", 0)) >= n, reason
    assert await device_sequence(env, "victim") == 1  # nothing written for the victim


async def test_mqtt_report_out_of_range_is_refused_and_nobody_waits(env: Env) -> None:
    """A correctly sealed hello whose sequence no database column holds (2^63) used to fail its
    batch forever; now it is refused as ``shape`` and acknowledged, and every later report, of
    that device or another, is applied."""
    secrets = await env.devices([("big", "mqtt"), ("small", "mqtt")])
    before = rejected("mqtt", "shape")
    poison = protocol.seal(secrets["big"], "big", {1: "big", 2: 0, 3: 0, 4: 1, 5: 0, 6: 0, 9: 2**63})
    client = publisher(env)
    try:
        client.publish(protocol.status_topic("acme", "big"), poison, qos=1).wait_for_publish(5)
        for name, installed in (("small", 4), ("big", 3)):
            report = protocol.encode_report(secrets[name], hello(name, 2, installed))
            client.publish(protocol.status_topic("acme", name), report, qos=1).wait_for_publish(5)

        async def applied() -> bool:
            return (await device_sequence(env, "small"), await device_sequence(env, "big")) == (4, 3)

        await wait_for(applied)
    finally:
        client.loop_stop()
        client.disconnect()
    assert rejected("mqtt", "shape") - before == 1
    assert (await env.call("GET", "/dead-letters"))["total"] == 0  # refused, not set aside


async def coap_post(ctx: aiocoap.Context, env: Env, device: str, payload: bytes) -> aiocoap.Message:
    uri = f"{env.settings.public_coap_url}/s/acme/{device}"
    return await asyncio.wait_for(
        ctx.request(aiocoap.Message(code=Code.POST, uri=uri, payload=payload)).response, 20
    )


async def test_coap_bad_messages_get_4xx(env: Env) -> None:
    secrets = await env.devices([("cgood", "coap"), ("cother", "coap")])
    ctx = await aiocoap.Context.create_client_context()
    try:
        assert (await coap_post(ctx, env, "cgood", b"\xff\xfe")).code == Code.BAD_REQUEST
        assert (await coap_post(ctx, env, "cgood", cbor2.dumps([1, 2]))).code == Code.BAD_REQUEST
        big = b"\x00" * (protocol.MAX_REPORT_BYTES + 10)
        assert (await coap_post(ctx, env, "cgood", big)).code == Code.REQUEST_ENTITY_TOO_LARGE
        ghost = protocol.encode_report(b"x" * 32, hello("ghost", 1, 3))
        assert (await coap_post(ctx, env, "ghost", ghost)).code == Code.NOT_FOUND
        wrong_key = protocol.encode_report(secrets["cgood"], hello("cother", 1, 3))
        assert (await coap_post(ctx, env, "cother", wrong_key)).code == Code.UNAUTHORIZED
        foreign = protocol.encode_report(secrets["cgood"], hello("cgood", 1, 3))
        assert (await coap_post(ctx, env, "cother", foreign)).code == Code.FORBIDDEN
        ok = protocol.encode_report(secrets["cgood"], hello("cgood", 1, 4))
        assert (await coap_post(ctx, env, "cgood", ok)).code == Code.CHANGED
        assert await device_sequence(env, "cgood") == 4
        assert await device_sequence(env, "cother") == 1
        # a duplicate of an applied report is acknowledged again and changes nothing
        assert (await coap_post(ctx, env, "cgood", ok)).code == Code.CHANGED
    finally:
        await ctx.shutdown()


@pytest.mark.parametrize("size", [0, 1])
async def test_garbage_udp_does_not_stop_coap(env: Env, size: int) -> None:
    """Raw non-CoAP datagrams are ignored; the CoAP server still answers afterwards."""
    await env.devices([("udp", "coap")])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(20):
            s.sendto(b"\xde\xad" * size, ("127.0.0.1", env.settings.coap_port))
    ctx = await aiocoap.Context.create_client_context()
    try:
        resp = await coap_post(ctx, env, "udp", b"\x01")
        assert resp.code == Code.BAD_REQUEST
    finally:
        await ctx.shutdown()
