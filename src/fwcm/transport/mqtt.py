"""MQTT adapter of the server (paho-mqtt 2.x).

paho runs its network loop in its own thread; publishing is thread-safe, and inbound messages are
handed to the asyncio loop.  Status reports are acknowledged manually (``manual_ack``): the PUBACK
goes out only after the report is durable, so a report the device saw acknowledged is never lost.
The PUBACKs of a batch go out in one write, and packets are read from one buffered ``recv``
(:class:`BufferedClient`): per-packet system calls, not the packets, were the cost at scale.
A shared subscription (MQTT 5) spreads reports over server replicas. Its session ends with the
connection (clean start, session expiry 0): a persistent member that died would keep its
unacknowledged reports and keep being handed a share of new ones (Mosquitto 2.0 does), so a
replica gone for good would hold reports for as long as its session lived. Reports a replica had
received but not committed when it died are dropped by the broker; the engine recovers them by
repeating the notice of silent deployments, which a device answers with its final report (see
docs/operations.md). With MQTT 3.1.1 (no shared subscriptions) the session stays persistent.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MessageState
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fwcm import protocol
from fwcm.transport.inbound import Inbound
from fwcm.transport.notices import NoticeSender, Render

log = logging.getLogger(__name__)

SHARE_GROUP = "fwcm"
SESSION_EXPIRY_S = 7 * 24 * 3600
READ_CHUNK = 64 * 1024
PUBACK_HEADER = 0x40
PUBLISH_TYPE = 3
_PUBACK = struct.Struct("!BBH")
MAX_PACKETS_PER_READ = 2000
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK, "Success")
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)
RECONNECT_S = 1
"""The server retries a lost broker connection this often."""


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    tls: bool = False
    ca_file: str | None = None
    username: str | None = None
    password: str | None = None
    version: int = 5

    @classmethod
    def from_url(cls, url: str) -> MqttSettings:
        """``mqtt://user:pass@host:port``, ``mqtts://…?ca=/path/ca.pem``; ``?v=311`` for MQTT 3.1.1."""
        u = urlparse(url)
        if u.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"unsupported MQTT URL scheme {u.scheme!r} (use mqtt:// or mqtts://)")
        q = parse_qs(u.query)
        tls = u.scheme == "mqtts"
        return cls(
            host=u.hostname or "127.0.0.1",
            port=u.port or (8883 if tls else 1883),
            tls=tls,
            ca_file=q.get("ca", [None])[0],
            username=unquote(u.username) if u.username else None,
            password=unquote(u.password) if u.password else None,
            version=311 if q.get("v", ["5"])[0] in ("311", "3.1.1", "4") else 5,
        )

    def __repr__(self) -> str:  # never print the password
        return f"MqttSettings(host={self.host!r}, port={self.port}, tls={self.tls}, version={self.version})"


class _ReadBuffered:
    """A connected socket whose reads are served from one large ``recv``.

    paho reads every packet with at least three ``recv`` calls (type, length, body) and selects
    once per packet; each is a system call that also drops the interpreter lock, which under a
    stream of small reports costs more than the packets themselves.  ``pending`` tells paho's loop
    that buffered bytes are waiting (as it already asks TLS sockets), so it never blocks in
    ``select`` while a packet sits in the buffer.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._data = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._data):
            data = self._sock.recv(max(bufsize, READ_CHUNK))
            if len(data) <= bufsize:
                return data
            self._data, self._pos = data, 0
        chunk = self._data[self._pos : self._pos + bufsize]
        self._pos += len(chunk)
        return chunk

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._data) - self._pos + inner

    def whole_packet(self) -> tuple[int, bytes] | None:
        """The next packet (first byte, variable header and payload) when all of it is buffered,
        taken from the buffer; else None, and nothing is taken. A remaining length longer than
        four bytes is left for paho's reader, which refuses it."""
        data, start = self._data, self._pos
        read = read_varint(data, start + 1)
        if read is None:
            return None
        length, i = read
        if i + length > len(data):
            return None
        self._pos = i + length
        return data[start], data[i : i + length]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


Received = Callable[[str, bytes, int, int], None]
"""An inbound PUBLISH as the server needs it: topic, payload, packet id, QoS."""


def varint(n: int) -> bytes:
    """MQTT's variable byte integer (remaining length): 7 bits a byte, the high bit set while more
    follow."""
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(data: bytes | bytearray, at: int) -> tuple[int, int] | None:
    """The variable byte integer at ``at`` and the position after it; None when ``data`` ends
    first or it runs over four bytes."""
    value, shift = 0, 0
    for i in range(at, min(at + 4, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i + 1
    return None


def publish_packet(
    topic: str | bytes, payload: bytes, *, qos: int, retain: bool, mid: int, v5: bool = False
) -> bytes:
    """A PUBLISH packet (MQTT 5: without properties); ``parse_publish`` reads it back."""
    name = topic.encode() if isinstance(topic, str) else topic
    head = len(name).to_bytes(2, "big") + name + (mid.to_bytes(2, "big") if qos else b"")
    if v5:
        head += b"\x00"
    first = bytes(((PUBLISH_TYPE << 4) | (qos << 1) | int(retain),))
    return first + varint(len(head) + len(payload)) + head + payload


def parse_publish(command: int, packet: bytes | bytearray, v5: bool) -> tuple[str, bytes, int, int]:
    """Topic, payload, packet id and QoS of a PUBLISH's variable header and payload; MQTT 5
    properties are skipped (the server reads none). Raises ValueError on a malformed packet."""
    qos = (command >> 1) & 3
    end = 2 + int.from_bytes(packet[:2], "big")
    if len(packet) < end + (2 if qos else 0) or qos == 3:
        raise ValueError("PUBLISH shorter than its header")
    topic = packet[2:end].decode("utf-8")
    mid = 0
    if qos:
        mid, end = int.from_bytes(packet[end : end + 2], "big"), end + 2
    if v5:
        read = read_varint(packet, end)  # the properties' length
        if read is None:
            raise ValueError("PUBLISH properties length cut short or over 4 bytes")
        length, end = read
        end += length
        if end > len(packet):
            raise ValueError("PUBLISH properties cut short")
    return topic, bytes(packet[end:]), mid, qos


def _fresh_in_packet() -> Any:
    """paho's state of the next packet to read, as its reader leaves it after each packet."""
    return {
        "command": 0,
        "have_remaining": 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": 0,
        "packet": bytearray(),
        "to_process": 0,
        "pos": 0,
    }


class BufferedClient(mqtt.Client):
    """paho's client reading through :class:`_ReadBuffered` and draining the buffer per wake-up.

    With ``on_received`` set, QoS 0 and 1 PUBLISH packets skip paho's message objects, MQTT 5
    property decoding and callback matching and go straight to it (paho still reads the packet
    and keeps the session): the server's ingest rate is bound by the cost per report."""

    on_received: Received | None = None
    _may_queue = True
    """Some QoS 1 message may wait for room in the in-flight window (paho's own check scans every
    message in flight on each PUBACK, a thousand when a campaign starts)."""

    def _create_socket(self) -> Any:
        return _ReadBuffered(super()._create_socket())

    def publish(self, *args: Any, **kwargs: Any) -> mqtt.MQTTMessageInfo:
        info = super().publish(*args, **kwargs)
        with self._out_message_mutex:
            held = self._out_messages.get(info.mid)
            if held is not None and held.state == MessageState.MQTT_MS_QUEUED:
                self._may_queue = True
        return info

    def publish_many(self, messages: Sequence[tuple[str, bytes]], *, retain: bool) -> None:
        """QoS 1 PUBLISHes queued as one write.

        Each message is kept as paho keeps it (until its PUBACK, held back while the in-flight
        window is full, sent again after a reconnect); only the wire work is shared: paho's
        ``publish`` builds, queues and wakes its network thread once per message, which set the
        pace of a campaign's fanout."""
        if self._sock is None:  # not connected: paho queues each for the reconnect
            for topic, payload in messages:
                self.publish(topic, payload, qos=1, retain=retain)
            return
        v5 = self._protocol == mqtt.MQTTv5
        now = mqtt.time_func()
        packets = []
        with self._out_message_mutex:
            window = self._max_inflight_messages
            for topic, payload in messages:
                mid = self._mid_generate()
                if mid in self._out_messages:  # 65,535 unacknowledged: paho's publish refuses it too
                    log.warning("MQTT: no packet id free for %s; its notice is repeated later", topic)
                    continue
                name = topic.encode()
                message = mqtt.MQTTMessage(mid, name)
                message.timestamp, message.payload, message.qos, message.retain = now, payload, 1, retain
                self._out_messages[mid] = message
                if window == 0 or self._inflight_messages < window:
                    self._inflight_messages += 1
                    message.state = MessageState.MQTT_MS_WAIT_FOR_PUBACK
                    packets.append(publish_packet(name, payload, qos=1, retain=retain, mid=mid, v5=v5))
                else:
                    message.state = MessageState.MQTT_MS_QUEUED
                    self._may_queue = True
            if packets:
                self._packet_queue((PUBLISH_TYPE << 4) | 2, b"".join(packets), 0, 1)

    def _messages_reconnect_reset_out(self) -> None:
        super()._messages_reconnect_reset_out()
        self._may_queue = True

    def _update_inflight(self) -> mqtt.MQTTErrorCode:
        """paho's, skipped while nothing waits: paho only queues when the window is full, and a
        scan that ends with room left has sent everything that waited. (A message queued just
        before this flag is set goes out on one of the PUBACKs of the full window.)"""
        if not self._may_queue:
            return mqtt.MQTT_ERR_SUCCESS
        rc = super()._update_inflight()
        if rc == mqtt.MQTT_ERR_SUCCESS and self._inflight_messages < self._max_inflight_messages:
            self._may_queue = False
        return rc

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> mqtt.MQTTErrorCode:
        """A PUBACK settles its message without paho's reason-code and property objects when no
        ``on_publish`` callback would read them."""
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self.on_publish is not None or len(packet) < 2:
            return super()._handle_pubackcomp(cmd)
        mid = int.from_bytes(packet[:2], "big")
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
        return mqtt.MQTT_ERR_SUCCESS

    def _handle_publish(self) -> mqtt.MQTTErrorCode:
        command = self._in_packet["command"]
        if self.on_received is None or (command >> 1) & 3 == 2:
            return super()._handle_publish()
        return self._received(command, self._in_packet["packet"])

    def _received(self, command: int, packet: bytes | bytearray) -> mqtt.MQTTErrorCode:
        """A QoS 0 or 1 PUBLISH handed to ``on_received`` (set) as topic, payload, id and QoS."""
        try:
            topic, payload, mid, qos = parse_publish(command, packet, self._protocol == mqtt.MQTTv5)
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("malformed PUBLISH from the broker (%s); reconnecting", exc)
            return mqtt.MQTT_ERR_PROTOCOL
        self.on_received(topic, payload, mid, qos)  # type: ignore[misc]
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return mqtt.MQTT_ERR_SUCCESS

    def ack_many(self, mids: list[int]) -> None:
        """Acknowledge QoS 1 messages with one write: ``ack`` queues, wakes the loop and sends a
        four-byte PUBACK per message (Remaining Length 2: reason Success, valid in MQTT 5 too)."""
        if mids:
            data = b"".join([_PUBACK.pack(PUBACK_HEADER, 2, mid) for mid in mids])
            self._packet_queue(PUBACK_HEADER, data, 0, 1)

    def _packet_read(self) -> mqtt.MQTTErrorCode:
        """paho's, for the packets that are whole in the read buffer: every one of them in this
        call, each in one piece, rather than one per call, byte by byte through three reads and
        paho's partial-packet bookkeeping. A report (QoS 0 or 1 PUBLISH) goes straight to
        ``on_received``; other packets through paho's handlers. A partial packet is paho's."""
        sock = self._sock
        if not isinstance(sock, _ReadBuffered) or self._in_packet["command"]:
            return super()._packet_read()
        rc, handled = mqtt.MQTT_ERR_SUCCESS, 0
        received, take = self.on_received is not None, sock.whole_packet
        while rc == mqtt.MQTT_ERR_SUCCESS and self._sock is sock and (whole := take()):
            command, body = whole
            handled += 1
            if received and command >> 4 == PUBLISH_TYPE and (command >> 1) & 3 != 2:
                rc = self._received(command, body)
            else:
                rc = self._handle_whole(command, body)
        if not handled:
            return super()._packet_read()
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        return rc

    def _handle_whole(self, command: int, body: bytes) -> mqtt.MQTTErrorCode:
        """One whole packet through paho's handlers, as its reader would hand it over."""
        self._in_packet["command"] = command
        self._in_packet["packet"] = bytearray(body)
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            log.warning("malformed packet from the broker (%s); reconnecting", exc)
            rc = mqtt.MQTT_ERR_PROTOCOL
        self._in_packet = _fresh_in_packet()
        return rc

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        sock = self._sock
        for _ in range(MAX_PACKETS_PER_READ):
            if rc != mqtt.MQTT_ERR_SUCCESS or self._sock is not sock or not isinstance(sock, _ReadBuffered):
                break
            if not sock.pending():
                break
            rc = super().loop_read(max_packets)
        return rc


def why_unreachable(settings: MqttSettings, timeout: float = 3.0) -> str:
    """Why a broker did not take our session, for the error message: paho retries a failed
    connect without saying why, so try TCP and the TLS handshake once more by hand."""
    try:
        with socket.create_connection((settings.host, settings.port), timeout=timeout) as sock:
            if settings.tls:
                ctx = ssl.create_default_context(cafile=settings.ca_file)
                with ctx.wrap_socket(sock, server_hostname=settings.host):
                    pass
    except ssl.SSLError as exc:
        return f"TLS handshake failed ({exc.reason or exc}); check the CA (?ca=) and the broker certificate"
    except OSError as exc:
        return f"cannot connect ({exc})"
    return "the broker took the connection but not the MQTT session (TLS or plain? credentials?)"


def make_client(
    settings: MqttSettings,
    client_id: str,
    *,
    manual_ack: bool = False,
    client_class: type[mqtt.Client] = BufferedClient,
    reconnect_max_s: int = 30,
) -> mqtt.Client:
    """A paho client configured from settings: TLS, credentials, reconnect backoff, no queue cap."""
    protocol_version = mqtt.MQTTv5 if settings.version == 5 else mqtt.MQTTv311
    client = client_class(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol_version,
        clean_session=None if protocol_version == mqtt.MQTTv5 else False,
        manual_ack=manual_ack,
    )
    if settings.tls:
        ctx = ssl.create_default_context(cafile=settings.ca_file)
        client.tls_set_context(ctx)
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    client.reconnect_delay_set(min_delay=1, max_delay=reconnect_max_s)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    return client


class MqttTransport(NoticeSender):
    """Publishes notices and receives status reports and presence for the server."""

    def __init__(
        self,
        url: str,
        client_id: str,
        deliver: Callable[[Inbound], None],
        *,
        shared: bool = True,
    ) -> None:
        self.settings = MqttSettings.from_url(url)
        self.client_id = client_id
        self._deliver = deliver
        self._shared = shared and self.settings.version == 5
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = threading.Event()
        self._stopping = False
        self._inbox: deque[Inbound] = deque()
        self._inbox_lock = threading.Lock()
        self._drain_scheduled = False
        self._acks: deque[int] = deque()
        self._ack_scheduled = False
        # One client per replica: retrying every second costs the broker nothing, and paho's doubling
        # backoff left a server offline for up to its maximum after the broker came back.
        self.client = make_client(self.settings, client_id, manual_ack=True, reconnect_max_s=RECONNECT_S)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        if isinstance(self.client, BufferedClient):
            self.client.on_received = self._on_received

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, timeout: float = 15.0) -> None:
        self._loop = asyncio.get_running_loop()
        props = None
        if self.settings.version == 5:
            # Shared: no session outlives the connection, so the broker stops routing reports to a
            # dead replica at once (a persistent member keeps receiving its share while offline).
            expiry = 0 if self._shared else SESSION_EXPIRY_S
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = expiry
            self.client.connect_async(
                self.settings.host,
                self.settings.port,
                keepalive=30,
                clean_start=expiry == 0,
                properties=props,
            )
        else:
            self.client.connect_async(self.settings.host, self.settings.port, keepalive=30)
        self.client.loop_start()
        ok = await asyncio.to_thread(self._connected.wait, timeout)
        if not ok:
            self.client.loop_stop()
            why = await asyncio.to_thread(why_unreachable, self.settings)
            where = f"{self.settings.host}:{self.settings.port}"
            raise ConnectionError(f"MQTT broker {where} not reachable: {why}")

    async def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- paho callbacks (paho's thread) ---------------------------------------------------------

    def _topic(self, filter_: str) -> str:
        return f"$share/{SHARE_GROUP}/{filter_}" if self._shared else filter_

    def _on_connect(self, client: mqtt.Client, _ud: object, _flags: object, rc: object, _p: object) -> None:
        if getattr(rc, "is_failure", False):
            log.warning("MQTT connect refused: %s", rc)
            return
        client.subscribe(
            [(self._topic(protocol.STATUS_SUBSCRIPTION), 1), (self._topic(protocol.PRESENCE_SUBSCRIPTION), 1)]
        )
        log.info("MQTT connected to %s:%d as %s", self.settings.host, self.settings.port, self.client_id)
        self._connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _ud: object, _flags: object, rc: object, _p: object) -> None:
        self._connected.clear()
        if not self._stopping:
            log.warning("MQTT disconnected (%s); paho reconnects with backoff", rc)

    def _on_message(self, _c: mqtt.Client, _ud: object, msg: mqtt.MQTTMessage) -> None:
        self._on_received(msg.topic, bytes(msg.payload), msg.mid, msg.qos)

    def _on_received(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        def ack(_error: object = None) -> None:
            if qos == 1:
                self._ack(mid)
            elif qos == 2:
                self.client.ack(mid, qos)

        try:
            tenant, device, leaf = protocol.parse_device_topic(topic)
        except protocol.ProtocolError:
            ack()
            return
        kind = "status" if leaf == "status" else "presence" if leaf == "presence" else None
        if kind is None:
            ack()
            return
        inbound = Inbound(
            transport="mqtt",
            kind=kind,
            tenant=tenant,
            device=device,
            payload=payload,
            on_done=ack,
        )
        self._handoff(inbound)

    def _ack(self, mid: int) -> None:
        """Collect a PUBACK; those collected until the loop turns go out in one write."""
        self._acks.append(mid)
        with self._inbox_lock:
            if self._ack_scheduled or self._loop is None:
                return
            self._ack_scheduled = True
        self._loop.call_soon_threadsafe(self._flush_acks)

    def _flush_acks(self) -> None:
        with self._inbox_lock:
            self._ack_scheduled = False
        mids: list[int] = []
        acks = self._acks
        while acks:
            mids.append(acks.popleft())
        if isinstance(self.client, BufferedClient):
            self.client.ack_many(mids)
        else:
            for mid in mids:
                self.client.ack(mid, 1)

    def _handoff(self, inbound: Inbound) -> None:
        """Queue a message for the event loop; one wake-up per burst rather than one per message
        (waking the loop costs a system call and a loop iteration each)."""
        loop = self._loop
        if loop is None:
            return
        self._inbox.append(inbound)
        with self._inbox_lock:
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        """On the event loop: hand every queued message to ``deliver``, in arrival order."""
        with self._inbox_lock:
            self._drain_scheduled = False
        inbox, deliver = self._inbox, self._deliver
        while inbox:
            deliver(inbox.popleft())

    # -- outbound -------------------------------------------------------------------------------

    def send_notice(self, tenant: str, device: str, render: Render) -> bool:
        """Publish the notice retained with QoS 1: a device that subscribes later (or is offline
        now) still receives its current notice."""
        self.send_notices([(tenant, device, render)])
        return True

    def send_notices(self, notices: Sequence[tuple[str, str, Render]]) -> None:
        messages = [(protocol.notice_topic(tenant, device), render()) for tenant, device, render in notices]
        if isinstance(self.client, BufferedClient):
            self.client.publish_many(messages, retain=True)
            return
        for topic, payload in messages:
            self.client.publish(topic, payload, qos=1, retain=True)

    def clear_notice(self, tenant: str, device: str) -> None:
        self.client.publish(protocol.notice_topic(tenant, device), b"", qos=1, retain=True)
