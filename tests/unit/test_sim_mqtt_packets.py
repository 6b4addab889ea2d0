"""The device MQTT client's packet codec and its reading of the byte stream: packets split across
reads are reassembled, PUBLISH packets reach the handler and are acknowledged, and anything
malformed or oversized ends the connection instead of raising into the event loop."""

from __future__ import annotations

import asyncio
import struct

import paho.mqtt.client as mqtt
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.mqtt_client import MAX_PACKET, DeviceMqtt, Will, connect_packet, publish_packet
from fwcm.transport.mqtt import parse_publish


class Wire(asyncio.Transport):
    """The transport seam: records what the client writes and whether it dropped the line."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True


def split(packet: bytes) -> tuple[int, bytes]:
    """First byte and body of one packet (remaining length decoded)."""
    length, i, shift = 0, 1, 0
    while True:
        byte = packet[i]
        length |= (byte & 0x7F) << shift
        i += 1
        shift += 7
        if not byte & 0x80:
            break
    assert len(packet) == i + length
    return packet[0], packet[i:]


@given(
    topic=st.text(min_size=1, max_size=80).filter(lambda t: "\0" not in t),
    payload=st.binary(max_size=300),
    qos=st.sampled_from([0, 1]),
    retain=st.booleans(),
    mid=st.integers(1, 0xFFFF),
)
def test_publish_packets_round_trip_through_the_servers_parser(
    topic: str, payload: bytes, qos: int, retain: bool, mid: int
) -> None:
    first, body = split(publish_packet(topic, payload, qos=qos, retain=retain, mid=mid))
    assert first >> 4 == 3 and first & 1 == int(retain)
    assert parse_publish(first, body, v5=False) == (topic, payload, mid if qos else 0, qos)


def test_connect_packet_fields() -> None:
    packet = connect_packet(
        "acme.d1", username="u", password="p", clean_session=False, keepalive=30, will=Will("t/p", b"0")
    )
    first, body = split(packet)
    assert first == 0x10
    assert body[:7] == b"\x00\x04MQTT\x04"
    flags = body[7]
    assert flags == 0x80 | 0x40 | 0x20 | (1 << 3) | 0x04  # user, password, will retain, QoS 1, will
    assert body[8:10] == (30).to_bytes(2, "big")
    assert body[10:] == b"\x00\x07acme.d1" + b"\x00\x03t/p" + b"\x00\x010" + b"\x00\x01u" + b"\x00\x01p"


def test_connect_packet_decodes_with_paho() -> None:
    """paho writes the same CONNECT for the same options."""
    ours = connect_packet("c1", username="u", password="pw", clean_session=True, keepalive=60, will=None)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="c1", clean_session=True)
    client.username_pw_set("u", "pw")
    sent: list[bytes] = []
    client._packet_queue = lambda command, packet, mid, qos, info=None: sent.append(bytes(packet))  # type: ignore[method-assign]
    client._keepalive = 60
    client._send_connect(60)
    assert sent == [ours]


async def connected() -> tuple[DeviceMqtt, Wire, list[tuple[str, bytes]]]:
    got: list[tuple[str, bytes]] = []
    proto = DeviceMqtt(lambda t, p: got.append((t, p)), keepalive=30)
    wire = Wire()
    proto.connection_made(wire)
    return proto, wire, got


async def test_packets_split_at_every_byte_are_reassembled_and_acknowledged() -> None:
    proto, wire, got = await connected()
    stream = publish_packet("n/a/d1", b"x" * 200, qos=1, retain=True, mid=7) + publish_packet(
        "n/a/d1", b"second", qos=0, retain=False, mid=0
    )
    for i in range(len(stream)):
        proto.data_received(stream[i : i + 1])
    assert got == [("n/a/d1", b"x" * 200), ("n/a/d1", b"second")]
    assert bytes(wire.written) == struct.pack("!BBH", 0x40, 2, 7)  # one PUBACK, for the QoS 1 one
    assert not wire.aborted


async def test_an_acknowledgement_completes_the_waiting_publish() -> None:
    proto, wire, _ = await connected()
    sending = asyncio.ensure_future(proto.publish("s/a/d1", b"report"))
    await asyncio.sleep(0)
    first, body = split(bytes(wire.written))
    _, _, mid, qos = parse_publish(first, body, v5=False)
    assert qos == 1 and not sending.done()
    proto.data_received(struct.pack("!BBH", 0x40, 2, mid))
    await asyncio.wait_for(sending, 1)


async def test_malformed_or_oversized_packets_end_the_connection() -> None:
    bad = [
        b"\x30\xff\xff\xff\xff\x01",  # remaining length over 4 bytes
        b"\x30" + bytes([0x80, 0x80, 0x80 | ((MAX_PACKET + 1) >> 21 & 0x7F), 0x01]),  # oversized
        b"\x30\x05\x00\x09abc",  # topic longer than the packet
        b"\x34\x04\x00\x01a\x00",  # QoS 2, never subscribed with it
        b"\x90\x02\x00\x01",  # SUBACK without its return code
        b"\xf0\x00",  # a packet type a client never receives
    ]
    for data in bad:
        proto, wire, got = await connected()
        sending = asyncio.ensure_future(proto.publish("s/a/d1", b"r"))
        await asyncio.sleep(0)
        proto.data_received(data)
        assert wire.aborted, data
        assert got == []
        proto.connection_lost(None)  # what asyncio does once the transport is aborted
        assert proto.closed.done()
        assert isinstance(await asyncio.gather(sending, return_exceptions=True), list)
        assert sending.exception() is not None


@settings(max_examples=200)
@given(st.binary(max_size=64))
def test_any_bytes_from_the_broker_never_raise(data: bytes) -> None:
    async def run() -> None:
        proto, _wire, _ = await connected()
        proto.data_received(data)

    asyncio.run(run())
