"""Only a device reads its own notices: the brokers `fwcm demo` and the tests start (Mosquitto and
the embedded amqtt broker) admit the service account and the device accounts only, and confine each
device to its own topics.  Raw MQTT clients play server, devices and strangers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fwcm import protocol
from fwcm.transport.accounts import Credentials, device_credentials
from fwcm.transport.broker import Broker, mosquitto_available, start_amqtt, start_mosquitto
from fwcm.transport.mqtt import MqttSettings

pytestmark = pytest.mark.timeout(120)

TENANT = "acme"


def creds(name: str, tenant: str = TENANT) -> Credentials:
    return device_credentials(name.encode().ljust(32, b"\0"), tenant, name)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("mosquitto", marks=pytest.mark.skipif(not mosquitto_available(), reason="no Mosquitto")),
        "amqtt",
    ],
)
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    with start_mosquitto() if request.param == "mosquitto" else start_amqtt() as b:
        b.admit([creds("d1"), creds("d2"), creds("d3")])
        yield b


@dataclass
class Client:
    """A paho client connected (or refused) with a record of what it received."""

    client: mqtt.Client
    rc: list[object] = field(default_factory=list)
    received: list[tuple[str, bytes]] = field(default_factory=list)
    disconnects: int = 0

    @property
    def accepted(self) -> bool:
        return bool(self.rc) and not getattr(self.rc[0], "is_failure", True)

    def wait_for(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    def wait_until(self, message: tuple[str, bytes], timeout: float = 10.0) -> None:
        """Until ``message`` arrived (QoS 1 may deliver an earlier one twice first)."""
        deadline = time.monotonic() + timeout
        while message not in self.received and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(
    port: int,
    client_id: str,
    account: Credentials | None,
    *,
    clean: bool = True,
    will: str | None = None,
    v5: bool = False,
) -> Client:
    """Connect and wait for the CONNACK (or the refusal)."""
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else clean,
    )
    out = Client(c)
    if account is not None:
        c.username_pw_set(account.username, account.password)
    if will is not None:
        c.will_set(will, b"0", qos=1, retain=True)
    c.on_connect = lambda _c, _u, _f, rc, _p: out.rc.append(rc)
    c.on_message = lambda _c, _u, m: out.received.append((m.topic, m.payload))

    def gone(*_a: object) -> None:
        out.disconnects += 1

    c.on_disconnect = gone
    c.reconnect_delay_set(30, 60)  # a refused client must not come back during the test
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    deadline = time.monotonic() + 5
    while not out.rc and not out.disconnects and time.monotonic() < deadline:
        time.sleep(0.01)
    return out


def server(broker: Broker) -> Client:
    s = MqttSettings.from_url(broker.service_url)
    assert s.username is not None and s.password is not None
    c = connect(
        s.port, f"fwcm-server-{time.monotonic_ns()}", Credentials(s.username, s.password), v5=s.version == 5
    )
    assert c.accepted, c.rc
    return c


def subscribed(c: Client, *filters: str) -> Client:
    for f in filters:
        c.client.subscribe(f, qos=1)
    time.sleep(0.3)
    return c


def test_anonymous_and_wrong_password_are_refused(broker: Broker) -> None:
    anonymous = connect(broker.port, "stranger", None)
    wrong = connect(broker.port, "acme.d1", Credentials("acme/d1", "guessed"))
    unknown = connect(broker.port, "acme.nobody", creds("nobody"))
    for c in (anonymous, wrong, unknown):
        assert not c.accepted
        c.close()
    d1 = connect(broker.port, "acme.d1", creds("d1"))
    assert d1.accepted
    d1.close()


def test_a_device_receives_its_own_notice_and_nothing_else(broker: Broker) -> None:
    srv = server(broker)
    d1 = subscribed(connect(broker.port, "acme.d1", creds("d1")), protocol.notice_topic(TENANT, "d1"))
    # d2 asks for d1's notices, for every fwcm topic and for everything
    d2 = subscribed(
        connect(broker.port, "acme.d2", creds("d2")),
        protocol.notice_topic(TENANT, "d1"),
        "fwcm/v1/#",
        "#",
        protocol.notice_topic(TENANT, "d2"),
    )
    try:
        srv.client.publish(protocol.notice_topic(TENANT, "d1"), b"token for d1", qos=1, retain=True)
        srv.client.publish(protocol.notice_topic(TENANT, "d2"), b"token for d2", qos=1, retain=True)
        d1.wait_for(1)
        d2.wait_for(1)
        time.sleep(0.5)  # anything d2 should not get would have arrived with its own
        assert d1.received == [(protocol.notice_topic(TENANT, "d1"), b"token for d1")]
        assert d2.received == [(protocol.notice_topic(TENANT, "d2"), b"token for d2")]
        # retained notices are not handed to a client that connects later either
        d3 = subscribed(connect(broker.port, "acme.d3", creds("d3")), "fwcm/v1/#", "#")
        stranger = connect(broker.port, "someone", None)
        time.sleep(0.5)
        assert d3.received == [] and stranger.received == []
        d3.close()
        stranger.close()
    finally:
        for c in (srv, d1, d2):
            c.close()


def test_a_device_publishes_only_on_its_own_status_and_presence(broker: Broker) -> None:
    srv = subscribed(server(broker), protocol.STATUS_SUBSCRIPTION, protocol.PRESENCE_SUBSCRIPTION)
    d2 = connect(broker.port, "acme.d2", creds("d2"))
    try:
        d2.client.publish(protocol.status_topic(TENANT, "d1"), b"forged report", qos=1)
        d2.client.publish(protocol.presence_topic(TENANT, "d1"), b"0", qos=1, retain=True)
        d2.client.publish(protocol.notice_topic(TENANT, "d1"), b"forged notice", qos=1, retain=True)
        d2.client.publish(protocol.status_topic(TENANT, "d2"), b"own report", qos=1)
        d2.client.publish(protocol.presence_topic(TENANT, "d2"), b"1", qos=1, retain=True)
        srv.wait_for(2)
        time.sleep(0.5)
        assert sorted(srv.received) == [
            (protocol.presence_topic(TENANT, "d2"), b"1"),
            (protocol.status_topic(TENANT, "d2"), b"own report"),
        ]
        d1 = subscribed(connect(broker.port, "acme.d1", creds("d1")), protocol.notice_topic(TENANT, "d1"))
        time.sleep(0.3)
        assert (protocol.notice_topic(TENANT, "d1"), b"forged notice") not in d1.received
        d1.close()
    finally:
        srv.close()
        d2.close()


def test_a_last_will_reaches_the_server(broker: Broker) -> None:
    srv = subscribed(server(broker), protocol.PRESENCE_SUBSCRIPTION)
    presence = protocol.presence_topic(TENANT, "d3")
    d3 = connect(broker.port, "acme.d3", creds("d3"), will=presence)
    try:
        assert d3.accepted
        d3.client.publish(presence, b"1", qos=1, retain=True)
        srv.wait_for(1)
        sock = d3.client.socket()
        assert sock is not None
        sock.close()  # an unclean drop: the broker publishes the will
        srv.wait_until((presence, b"0"))
        assert srv.received[-1] == (presence, b"0")
    finally:
        srv.close()
        d3.client.loop_stop()


def test_nobody_takes_a_device_session_over_by_its_client_id(broker: Broker) -> None:
    srv = server(broker)
    topic = protocol.notice_topic(TENANT, "d1")
    d1 = subscribed(connect(broker.port, "acme.d1", creds("d1"), clean=False), topic)
    try:
        # a stranger without credentials, then another device, with d1's client id and a clean session
        stranger = connect(broker.port, "acme.d1", None)
        d2 = connect(broker.port, "acme.d1", creds("d2"))
        assert not stranger.accepted and d2.accepted
        stranger.close()
        d2.close()
        d1.received.clear()
        srv.client.publish(topic, b"still for d1", qos=1, retain=True)
        d1.wait_for(1)
        assert d1.client.is_connected() and d1.disconnects == 0
        assert (topic, b"still for d1") in d1.received
    finally:
        srv.close()
        d1.close()


@pytest.mark.skipif(not mosquitto_available(), reason="no Mosquitto")
def test_devices_cannot_log_in_where_the_server_connects() -> None:
    with start_mosquitto() as b:
        b.admit([creds("d1")])
        assert b.service_port is not None and b.service_port != b.port
        on_service = connect(b.service_port, "acme.d1", creds("d1"))
        assert not on_service.accepted
        on_service.close()


def test_a_removed_account_no_longer_gets_in(broker: Broker) -> None:
    gone = creds("gone")
    broker.admit([creds("d1"), creds("d2"), creds("d3"), gone])
    srv = server(broker)
    topic = protocol.notice_topic(TENANT, "gone")
    c = subscribed(connect(broker.port, "acme.gone", gone), topic)
    assert c.accepted
    try:
        broker.admit([creds("d1"), creds("d2"), creds("d3")])
        srv.client.publish(topic, b"after removal", qos=1, retain=True)
        time.sleep(0.5)
        # Mosquitto drops the connection on reload; amqtt keeps it but delivers nothing to it
        assert (topic, b"after removal") not in c.received
        if broker.kind == "mosquitto":
            assert not c.client.is_connected()
        again = connect(broker.port, "acme.gone", gone)
        assert not again.accepted
        again.close()
    finally:
        srv.close()
        c.close()
