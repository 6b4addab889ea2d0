"""A device's MQTT 3.1.1 client: one connection, QoS 0 and 1, no threads, no timers but keep-alive.

It does what the embedded clients of constrained devices do (connect with a last will, subscribe,
publish and wait for the PUBACK, acknowledge what arrives, ping) and nothing else, so that one
process can run thousands of simulated devices: a general-purpose client costs a thread per
connect and a wake-up per client per second, which at 10,000 devices was most of the simulator's
CPU. Inbound PUBLISH packets are parsed by the server's own parser (one rule for both sides).
Anything malformed from the broker ends the connection; the device then reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass

from fwcm.transport.mqtt import parse_publish, publish_packet, varint

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGRESP = 1, 2, 3, 4, 8, 9, 13
"""The packet types this client sends or expects (MQTT 3.1.1, 2.2.1)."""
MAX_PACKET = 256 * 1024
"""Largest packet accepted from the broker: notices are a few hundred bytes."""
_PUBACK = struct.Struct("!BBH")


class MqttError(Exception):
    """The connection failed, was refused, or ended before the exchange completed."""


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect_packet(
    client_id: str,
    *,
    username: str | None,
    password: str | None,
    clean_session: bool,
    keepalive: int,
    will: Will | None,
) -> bytes:
    flags = (0x02 if clean_session else 0) | (0x80 if username is not None else 0)
    flags |= 0x40 if password is not None else 0
    body = b"\x00\x04MQTT\x04"
    tail = _str(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        tail += _str(will.topic) + _str(will.payload)
    if username is not None:
        tail += _str(username)
    if password is not None:
        tail += _str(password)
    return _packet(CONNECT << 4, body + bytes([flags]) + keepalive.to_bytes(2, "big") + tail)


class DeviceMqtt(asyncio.Protocol):
    """One device's connection.  ``await DeviceMqtt.connect(...)``, then subscribe and publish;
    ``on_message(topic, payload)`` is called for every PUBLISH, before it is acknowledged."""

    def __init__(self, on_message: Callable[[str, bytes], None], keepalive: int) -> None:
        self.on_message = on_message
        self.keepalive = keepalive
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiting: dict[tuple[int, int], asyncio.Future[int]] = {}
        self._next_mid = 0
        self._ping: asyncio.TimerHandle | None = None
        self._ping_answered = True
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        on_message: Callable[[str, bytes], None],
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = False,
        keepalive: int = 30,
        will: Will | None = None,
        tls: ssl.SSLContext | None = None,
        timeout: float = 15.0,
    ) -> DeviceMqtt:
        """Open the connection and wait for the broker's CONNACK; raise MqttError if refused."""
        loop = asyncio.get_running_loop()
        proto = cls(on_message, keepalive)
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: proto, host, port, ssl=tls)
                packet = connect_packet(
                    client_id,
                    username=username,
                    password=password,
                    clean_session=clean_session,
                    keepalive=keepalive,
                    will=will,
                )
                code = await proto._exchange(CONNACK, 0, packet)
        except (OSError, TimeoutError, MqttError) as exc:
            proto.abort()
            raise MqttError(f"connect failed: {exc!r}") from None
        if code != 0:
            proto.abort()
            raise MqttError(f"connection refused, return code {code}")
        return proto

    # -- requests ---------------------------------------------------------------------------

    async def subscribe(self, topic: str, qos: int = 1, timeout: float = 15.0) -> None:
        mid = self._mid()
        packet = _packet((SUBSCRIBE << 4) | 2, mid.to_bytes(2, "big") + _str(topic) + bytes([qos]))
        async with asyncio.timeout(timeout):
            granted = await self._exchange(SUBACK, mid, packet)
        if granted == 0x80:
            raise MqttError(f"subscription to {topic!r} refused")

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 15.0
    ) -> None:
        """Send; with QoS 1 return once the broker acknowledged it."""
        if not qos:
            self._write(publish_packet(topic, payload, qos=0, retain=retain, mid=0))
            return
        mid = self._mid()
        async with asyncio.timeout(timeout):
            await self._exchange(PUBACK, mid, publish_packet(topic, payload, qos=qos, retain=retain, mid=mid))

    async def disconnect(self) -> None:
        """End cleanly: the broker discards the last will."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"\xe0\x00")
            self._transport.close()
        await asyncio.shield(self.closed)

    def abort(self) -> None:
        """Drop the connection as a power cut would: the broker publishes the last will."""
        if self._transport is not None:
            self._transport.abort()

    def _mid(self) -> int:
        self._next_mid = self._next_mid % 0xFFFF + 1
        return self._next_mid

    async def _exchange(self, answer: int, mid: int, packet: bytes) -> int:
        """Write ``packet`` and wait for the ``answer`` packet with ``mid``; its result code."""
        if self.closed.done():
            raise MqttError("connection closed")
        fut = asyncio.get_running_loop().create_future()
        self._waiting[(answer, mid)] = fut
        try:
            self._write(packet)
            return await fut
        finally:
            self._waiting.pop((answer, mid), None)

    def _write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise MqttError("connection closed")
        self._transport.write(data)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._ping = asyncio.get_running_loop().call_later(self.keepalive, self._keep_alive)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ping is not None:
            self._ping.cancel()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(MqttError(f"connection lost: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 2 and self._transport is not None and not self._transport.is_closing():
            length, start = 0, 1
            for shift in (0, 7, 14, 21):
                if start >= len(buf):
                    return  # the length itself is not complete yet
                byte = buf[start]
                start += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
            else:
                return self._fail("remaining length over 4 bytes")
            if length > MAX_PACKET:
                return self._fail(f"packet of {length} bytes")
            if len(buf) < start + length:
                return
            first, body = buf[0], bytes(buf[start : start + length])
            del buf[: start + length]
            try:
                self._handle(first, body)
            except ValueError as exc:
                return self._fail(str(exc))

    def _handle(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == PUBLISH:
            topic, payload, mid, qos = parse_publish(first, body, v5=False)
            if qos > 1:
                raise ValueError("QoS 2 was never asked for")
            self.on_message(topic, payload)
            if qos:
                self._write(_PUBACK.pack(PUBACK << 4, 2, mid))
        elif kind in (CONNACK, PUBACK, SUBACK):
            if len(body) < (3 if kind == SUBACK else 2):
                raise ValueError(f"packet type {kind} too short")
            if kind == CONNACK:
                key, code = (CONNACK, 0), body[1]
            else:
                key, code = (kind, int.from_bytes(body[:2], "big")), body[2] if kind == SUBACK else 0
            fut = self._waiting.get(key)
            if fut is not None and not fut.done():
                fut.set_result(code)
        elif kind == PINGRESP:
            self._ping_answered = True
        else:
            raise ValueError(f"unexpected packet type {kind}")

    def _fail(self, why: str) -> None:
        log.warning("MQTT: %s from the broker; dropping the connection", why)
        self.abort()

    def _keep_alive(self) -> None:
        """PINGREQ every keep-alive period; a ping left unanswered for a whole period ends the
        connection (the broker or the path to it is gone)."""
        if not self._ping_answered:
            return self._fail("no PINGRESP within the keep-alive period")
        self._ping_answered = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"\xc0\x00")
            self._ping = asyncio.get_running_loop().call_later(self.keepalive, self._keep_alive)
