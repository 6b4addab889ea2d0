"""The read buffer under the server's paho client: packets split anywhere across reads come out
byte for byte, and ``pending`` says when paho must not wait in select; the lean PUBLISH parser
reads what paho's own decoder reads."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt._packet import decode_publish
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fwcm.transport.mqtt import READ_CHUNK, _ReadBuffered, parse_publish
from fwcm.transport.mqtt import publish_packet as fwcm_publish_packet


class ChunkSocket:
    """Hands out a byte stream in given chunk sizes; then would block (or reports EOF)."""

    def __init__(self, data: bytes, sizes: list[int], eof: bool = False) -> None:
        self.data, self.sizes, self.eof = data, sizes, eof
        self.calls = 0

    def recv(self, bufsize: int) -> bytes:
        self.calls += 1
        if not self.data:
            if self.eof:
                return b""
            raise BlockingIOError
        n = min(self.sizes.pop(0) if self.sizes else len(self.data), bufsize)
        out, self.data = self.data[:n], self.data[n:]
        return out

    def fileno(self) -> int:
        return 42


@given(
    data=st.binary(min_size=1, max_size=5000),
    chunks=st.lists(st.integers(1, 3000), max_size=20),
    asks=st.lists(st.integers(1, 300), min_size=1, max_size=200),
)
def test_reads_return_the_stream_in_order(data: bytes, chunks: list[int], asks: list[int]) -> None:
    buffered = _ReadBuffered(ChunkSocket(data, chunks))
    out = bytearray()
    for n in asks * 50:
        try:
            part = buffered.recv(n)
        except BlockingIOError:
            break
        assert 0 < len(part) <= n
        out += part
    assert bytes(out) == data[: len(out)]
    assert buffered.pending() == 0 or len(out) < len(data)


def test_one_system_read_serves_many_small_packets() -> None:
    packets = b"".join(bytes([0x30, 3, 1, 2, 3]) for _ in range(1000))
    sock = ChunkSocket(packets, [len(packets)])
    buffered = _ReadBuffered(sock)
    for _ in range(1000):
        assert buffered.recv(1) == b"\x30"
        assert buffered.recv(1) == b"\x03"
        assert buffered.recv(3) == b"\x01\x02\x03"
    assert sock.calls == 1
    assert buffered.pending() == 0
    with pytest.raises(BlockingIOError):
        buffered.recv(1)


def test_pending_counts_buffered_bytes_and_eof_passes_through() -> None:
    sock = ChunkSocket(b"abcdef", [6], eof=True)
    buffered = _ReadBuffered(sock)
    assert buffered.recv(2) == b"ab"
    assert buffered.pending() == 4
    assert buffered.recv(10) == b"cdef"
    assert buffered.pending() == 0
    assert buffered.recv(1) == b""  # the peer closed: paho sees EOF as before
    assert buffered.fileno() == 42  # everything else is the socket's


def test_large_reads_are_not_capped_by_the_chunk() -> None:
    body = random.Random(1).randbytes(3 * READ_CHUNK)
    buffered = _ReadBuffered(ChunkSocket(body, [len(body)]))
    assert buffered.recv(len(body)) == body


NO_NUL = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
"""MQTT strings are UTF-8 without NUL (paho refuses NUL; a lone surrogate is not UTF-8)."""


def publish_packet(topic: bytes, payload: bytes, qos: int, mid: int, props: Properties | None) -> bytes:
    """A PUBLISH's variable header and payload, as a broker sends it."""
    head = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"")
    return head + (props.pack() if props is not None else b"") + payload


@given(
    topic=st.text(min_size=1, max_size=300),
    payload=st.binary(max_size=3000),
    qos=st.integers(0, 1),
    mid=st.integers(1, 65535),
    v5=st.booleans(),
    user=st.lists(st.tuples(st.text(NO_NUL, max_size=40), st.text(NO_NUL, max_size=200)), max_size=3),
    expiry=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
)
def test_the_lean_publish_parser_reads_what_paho_reads(
    topic: str, payload: bytes, qos: int, mid: int, v5: bool, user: list[tuple[str, str]], expiry: int | None
) -> None:
    props = None
    if v5:
        props = Properties(PacketTypes.PUBLISH)
        if expiry is not None:
            props.MessageExpiryInterval = expiry
        for pair in user:
            props.UserProperty = pair
    command = 0x30 | (qos << 1)
    packet = publish_packet(topic.encode(), payload, qos, mid, props)
    protocol = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
    paho = decode_publish(command, packet, protocol)
    assert parse_publish(command, packet, v5) == (paho.topic.decode(), paho.payload, paho.mid, paho.qos)


@given(command=st.sampled_from([0x30, 0x32, 0x33, 0x3B]), packet=st.binary(max_size=300), v5=st.booleans())
def test_a_malformed_publish_raises_value_error_only(command: int, packet: bytes, v5: bool) -> None:
    """Whatever the broker hands over, the parser returns or raises ValueError (the client then
    drops the connection and reconnects), never anything else."""
    with contextlib.suppress(ValueError):
        topic, body, _mid, qos = parse_publish(command, packet, v5)
        assert qos in (0, 1) and len(topic.encode()) + len(body) <= len(packet)


def read_like_paho(buffered: _ReadBuffered) -> tuple[int, bytes]:
    """One packet read the way paho's own reader does: a byte, the length byte by byte, the rest."""
    command = buffered.recv(1)[0]
    length, shift = 0, 0
    while True:
        byte = buffered.recv(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    body = b""
    while len(body) < length:
        body += buffered.recv(length - len(body))
    return command, body


@given(
    payloads=st.lists(st.binary(max_size=20_000), min_size=1, max_size=12),
    chunks=st.lists(st.integers(1, 40_000), max_size=30),
)
def test_whole_packets_are_taken_at_once_and_partial_ones_left_for_paho(
    payloads: list[bytes], chunks: list[int]
) -> None:
    """``whole_packet`` takes a packet only when all of it is buffered (one- to three-byte
    lengths, packets split anywhere); what it leaves, paho's byte-wise reader reads: together they
    return every packet as sent."""
    packets = [
        fwcm_publish_packet(f"t/{i}", p, qos=1, retain=bool(i % 2), mid=i + 1) for i, p in enumerate(payloads)
    ]
    buffered = _ReadBuffered(ChunkSocket(b"".join(packets), chunks))
    got = []
    for _ in packets:
        got.append(buffered.whole_packet() or read_like_paho(buffered))
    for i, (command, body) in enumerate(got):
        assert parse_publish(command, body, v5=False) == (f"t/{i}", payloads[i], i + 1, 1)


def test_a_length_over_four_bytes_is_left_to_paho() -> None:
    buffered = _ReadBuffered(ChunkSocket(b"\x30\xff\xff\xff\xff\x01" + b"x" * 10, [100]))
    buffered.recv(0)
    assert buffered.whole_packet() is None
    assert buffered.pending() == 16  # nothing taken


PINGRESP = b"\xd0\x00"


@given(
    payloads=st.lists(st.binary(max_size=3000), min_size=1, max_size=40),
    pings=st.sets(st.integers(0, 40), max_size=5),
    chunks=st.lists(st.integers(1, 9000), max_size=30),
)
def test_the_client_hands_over_every_report_in_order_and_paho_the_rest(
    payloads: list[bytes], pings: set[int], chunks: list[int]
) -> None:
    """The server's client takes every whole packet of a read at once: reports (QoS 0 and 1
    PUBLISH) go to ``on_received`` in the order sent, other packets (here PINGRESP) to paho's
    handlers, and a packet split across reads is finished by paho's reader."""
    from paho.mqtt.client import MQTT_ERR_SUCCESS, _ConnectionState

    from fwcm.transport.mqtt import MqttSettings, make_client

    stream = b""
    for i, p in enumerate(payloads):
        stream += PINGRESP if i in pings else b""
        stream += fwcm_publish_packet(f"t/{i}", p, qos=i % 2, retain=False, mid=i + 1, v5=True)
    client = make_client(MqttSettings.from_url("mqtt://127.0.0.1:1"), "reader", manual_ack=True)
    got: list[tuple[str, bytes, int, int]] = []
    client.on_received = lambda *m: got.append(m)
    client._sock = _ReadBuffered(ChunkSocket(stream, chunks))
    client._state = _ConnectionState.MQTT_CS_CONNECTED
    client._ping_t = 1.0  # a PINGRESP clears it
    try:
        for _ in range(len(stream) + 1):
            if client.loop_read() != MQTT_ERR_SUCCESS:
                break
    finally:
        client._sock = None
    mids = [i + 1 if i % 2 else 0 for i in range(len(payloads))]
    assert got == [(f"t/{i}", p, mids[i], i % 2) for i, p in enumerate(payloads)]
    assert client._ping_t == (0 if pings & set(range(len(payloads))) else 1.0)
