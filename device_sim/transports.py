"""Device-side transports: the notice/report link (MQTT or CoAP) and payload fetchers (HTTP, CoAP).

Everything here is asyncio: one MQTT connection per device (:mod:`device_sim.mqtt_client`), and
ONE CoAP context and ONE HTTP client shared by all devices of a process, since a device's identity
is in the MAC of its messages and not in its socket.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import logging
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlencode, urlsplit

import aiocoap
from aiocoap import resource
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from fwcm import protocol

from .mqtt_client import DeviceMqtt, MqttError, Will

log = logging.getLogger(__name__)
T = TypeVar("T")


async def within(aw: Awaitable[T], timeout: float) -> T:
    """``await aw``, raising TimeoutError after ``timeout`` seconds.

    Not ``asyncio.wait_for``: on Python 3.11 it returns the result of an awaitable that completes
    just as the caller is cancelled and drops the cancellation, so a device told to cancel an update
    in the middle of a block-wise download went on and installed it.
    """
    async with asyncio.timeout(timeout):
        return await aw


async def response_within(request: aiocoap.protocol.Request, timeout: float) -> aiocoap.Message:
    """The response to a CoAP request, or TimeoutError. The waiting is shielded: aiocoap sets the
    result of its response future itself and logs a traceback if a timeout cancelled it."""
    response = request.response
    response.add_done_callback(_retrieved)
    return await within(asyncio.shield(response), timeout)


def _retrieved(fut: asyncio.Future[aiocoap.Message]) -> None:
    """Mark an outcome nobody awaits any more as seen (a shutdown's LibraryShutdown, say)."""
    if not fut.cancelled():
        fut.exception()


NoticeHandler = Callable[[bytes], None]
Sink = Callable[[int, bytes], Awaitable[None]]
"""Receives (offset, chunk) in order; may raise to abort the transfer."""

COAP_BLOCK_SZX = 6
"""Block2 size exponent: 2**(6+4) = 1024 bytes, the largest non-BERT block."""


class LinkError(Exception):
    """The link to the server is down or an exchange timed out; retrying later may succeed."""


class ReportRejected(Exception):
    """The server refused a report for good (malformed, bad MAC, oversized): resending is useless."""


class FetchError(Exception):
    """A payload fetch failed.  ``permanent`` means this URI will not work if tried again."""

    def __init__(self, message: str, *, permanent: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.status = status


# -- shared clients ---------------------------------------------------------------------------


class SharedClients:
    """The process-wide CoAP contexts and HTTP limits, created on first use."""

    def __init__(
        self,
        *,
        coap_transports: list[str] | None = None,
        http_timeout: float = 30.0,
        http_connections: int = 64,
        coap_transfers: int = 256,
        coap_sockets: int = 32,
    ) -> None:
        self.http_slots = asyncio.Semaphore(http_connections)
        """Concurrent HTTP downloads, so thousands of devices do not open thousands of sockets at once."""
        self.coap_slots = asyncio.Semaphore(coap_transfers)
        self.http_timeout = http_timeout
        self.coap_sockets = coap_sockets
        self._coap: dict[int, aiocoap.Context] = {}
        self._coap_lock = asyncio.Lock()
        self._coap_transports = coap_transports
        self.pushes = PushedNotices()
        """Notices the server pushes to devices' endpoints (``POST /n/{tenant}/{device}``)."""

    async def coap(self, device: str = "") -> aiocoap.Context:
        """The CoAP context (one UDP socket) a device speaks and listens through.

        aiocoap keeps one confirmable exchange in flight per remote endpoint (NSTART = 1), so a
        fleet sharing a single socket would exchange one message at a time with the server; real
        devices each have their own endpoint.  Devices are spread over a pool of contexts, each
        device always on the same one.  Each context also serves the devices on it: the server
        pushes a notice to the endpoint a device observed from when it has no observation of it.
        """
        slot = zlib.crc32(device.encode()) % self.coap_sockets
        async with self._coap_lock:
            ctx = self._coap.get(slot)
            if ctx is None:
                site = resource.Site()
                site.add_resource(["n"], self.pushes)
                ctx = self._coap[slot] = await aiocoap.Context.create_server_context(
                    site, bind=("::", 0), transports=self._coap_transports or ["udp6"]
                )
            return ctx

    async def aclose(self) -> None:
        contexts, self._coap = list(self._coap.values()), {}
        for ctx in contexts:
            await ctx.shutdown()


class PushedNotices(resource.Resource, resource.PathCapable):
    """``POST /n/{tenant}/{device}`` on a device's endpoint: a notice the server pushed."""

    def __init__(self) -> None:
        super().__init__()
        self.handlers: dict[tuple[str, str], NoticeHandler] = {}

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return True

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        handler = self.handlers.get(tuple(request.opt.uri_path))
        if handler is None:
            return aiocoap.Message(code=Code.NOT_FOUND)
        handler(request.payload)
        return aiocoap.Message(code=Code.CHANGED)


# -- links ------------------------------------------------------------------------------------


class Link(abc.ABC):
    """A device's connection to the server: receives notices, delivers reports."""

    @abc.abstractmethod
    async def open(self, on_notice: NoticeHandler) -> None:
        """Connect; raise LinkError if that fails.  Notices are passed to ``on_notice``."""

    @abc.abstractmethod
    async def wait_closed(self) -> None:
        """Return when the connection is lost."""

    @abc.abstractmethod
    async def close(self, *, graceful: bool) -> None:
        """Disconnect; ``graceful=False`` drops the connection as a power cut would."""

    @abc.abstractmethod
    async def send(self, data: bytes) -> None:
        """Deliver one sealed report; return once the server acknowledged it."""


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    ca_file: Path | None

    @classmethod
    def parse(cls, url: str, ca_file: Path | None = None) -> MqttTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"MQTT URL must start with mqtt:// or mqtts://, got {url!r}")
        tls = parts.scheme == "mqtts"
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        if ca_file is None and "ca" in query:
            ca_file = Path(unquote(query["ca"]))
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ca_file=ca_file,
        )

    def with_credentials(self, username: str, password: str) -> MqttTarget:
        """The same broker, logged in to as ``username`` (a device's own account)."""
        return dataclasses.replace(self, username=username, password=password)

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)


class MqttLink(Link):
    """MQTT 3.1.1 with a persistent session (clean_session False), QoS 1 both ways, logged in with
    the target's credentials (the device's own account), through :mod:`device_sim.mqtt_client`.

    3.1.1 rather than 5 because both Mosquitto and amqtt (the embedded fallback broker) support it.
    Presence: retained b"1" after connect, retained last will b"0" for an unclean drop.
    """

    def __init__(self, target: MqttTarget, tenant: str, device: str, *, keepalive: int = 30) -> None:
        self.target = target
        self.tenant = tenant
        self.device = device
        self.keepalive = keepalive
        self._client: DeviceMqtt | None = None
        self._tls = target.tls_context()

    async def open(self, on_notice: NoticeHandler) -> None:
        presence = protocol.presence_topic(self.tenant, self.device)
        try:
            client = await DeviceMqtt.connect(
                self.target.host,
                self.target.port,
                lambda _topic, payload: on_notice(payload),
                client_id=f"{self.tenant}.{self.device}",
                username=self.target.username,
                password=self.target.password,
                clean_session=False,
                keepalive=self.keepalive,
                will=Will(presence, b"0", qos=1, retain=True),
                tls=self._tls,
            )
        except MqttError as exc:
            raise LinkError(f"MQTT {exc}") from None
        self._client = client
        try:
            await client.subscribe(protocol.notice_topic(self.tenant, self.device), qos=1)
            await client.publish(presence, b"1", qos=1, retain=True)
        except (MqttError, TimeoutError) as exc:
            await self.close(graceful=False)
            raise LinkError(f"MQTT subscribe failed: {exc!r}") from None

    async def wait_closed(self) -> None:
        if self._client is not None:
            await asyncio.shield(self._client.closed)

    async def close(self, *, graceful: bool) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if graceful:
            with contextlib.suppress(MqttError, TimeoutError):
                presence = protocol.presence_topic(self.tenant, self.device)
                await client.publish(presence, b"0", qos=1, retain=True, timeout=2)
            with contextlib.suppress(TimeoutError):
                await within(client.disconnect(), 5)
        client.abort()  # a power cut; after a clean DISCONNECT (or one that timed out) a no-op

    async def send(self, data: bytes) -> None:
        client = self._client
        if client is None:
            raise LinkError("not connected")
        try:
            await client.publish(protocol.status_topic(self.tenant, self.device), data, qos=1)
        except (MqttError, TimeoutError) as exc:
            raise LinkError(f"publish failed: {exc!r}") from None


class CoapLink(Link):
    """Observe ``/n/{tenant}/{device}?k=PASSWORD``; POST reports to ``/s/{tenant}/{device}``.

    The observation is registered again every ``refresh`` seconds (a restarted server forgets its
    observers, and a NAT forgets the way back), at once when it ends, and at once when the server
    pushes a notice, which it does only when it has no observation of this device.
    """

    PERMANENT = frozenset({Code.BAD_REQUEST, Code.UNAUTHORIZED, Code.REQUEST_ENTITY_TOO_LARGE})
    REOBSERVE_MIN_S = 1.0
    """Pushed notices trigger a new observation at most this often."""

    def __init__(
        self,
        clients: SharedClients,
        base_url: str,
        tenant: str,
        device: str,
        *,
        password: str,
        refresh: float = 60.0,
        timeout: float = 15.0,
    ) -> None:
        self.clients = clients
        self.base = base_url.rstrip("/")
        self.tenant = tenant
        self.device = device
        self.refresh = refresh
        self.timeout = timeout
        notice_path = "/".join(protocol.coap_notice_path(tenant, device))
        self._notice_uri = f"{self.base}/{notice_path}?{urlencode({'k': password})}"
        self._status_uri = self.base + "/" + "/".join(protocol.coap_status_path(tenant, device))
        self._reader: asyncio.Task[None] | None = None
        self._request: aiocoap.protocol.Request | None = None
        self._pushed = asyncio.Event()

    async def _register(self, on_notice: NoticeHandler) -> aiocoap.protocol.Request:
        ctx = await self.clients.coap(self.device)
        request = ctx.request(aiocoap.Message(code=Code.GET, uri=self._notice_uri, observe=0))
        try:
            first = await response_within(request, self.timeout)
        except (TimeoutError, aiocoap.error.Error, OSError) as exc:
            _forget(request)
            raise LinkError(f"CoAP observe failed: {exc!r}") from None
        if not first.code.is_successful():
            _forget(request)
            raise LinkError(f"CoAP observe refused: {first.code}")
        if first.payload:
            on_notice(first.payload)
        return request

    async def open(self, on_notice: NoticeHandler) -> None:
        def pushed(payload: bytes) -> None:
            on_notice(payload)
            self._pushed.set()

        self.clients.pushes.handlers[(self.tenant, self.device)] = pushed
        self._request = await self._register(on_notice)
        self._reader = asyncio.create_task(self._read(on_notice), name=f"coap-observe-{self.device}")

    async def _read(self, on_notice: NoticeHandler) -> None:
        loop = asyncio.get_running_loop()
        while True:
            request = self._request
            assert request is not None
            started = loop.time()
            follow = asyncio.create_task(_follow(request, on_notice))
            pushed = asyncio.create_task(self._pushed.wait())
            try:
                await asyncio.wait(
                    {follow, pushed}, timeout=self.refresh, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for t in (follow, pushed):
                    t.cancel()
                await asyncio.gather(follow, pushed, return_exceptions=True)
            _forget(request)
            if self._pushed.is_set():
                self._pushed.clear()
                await asyncio.sleep(max(0.0, self.REOBSERVE_MIN_S - (loop.time() - started)))
            try:
                self._request = await self._register(on_notice)
            except LinkError as exc:
                log.info("%s: %s", self.device, exc)
                return

    async def wait_closed(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._reader)

    async def close(self, *, graceful: bool) -> None:
        if self.clients.pushes.handlers.get((self.tenant, self.device)) is not None:
            del self.clients.pushes.handlers[(self.tenant, self.device)]
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._request is not None:
            _forget(self._request)
            self._request = None

    async def send(self, data: bytes) -> None:
        ctx = await self.clients.coap(self.device)
        message = aiocoap.Message(code=Code.POST, uri=self._status_uri, payload=data)
        try:
            response = await response_within(ctx.request(message), self.timeout)
        except (TimeoutError, aiocoap.error.Error, OSError) as exc:
            raise LinkError(f"CoAP status POST failed: {exc!r}") from None
        if response.code == Code.CHANGED:
            return
        if response.code in self.PERMANENT:
            raise ReportRejected(f"server refused report: {response.code} {response.payload[:80]!r}")
        raise LinkError(f"CoAP status POST answered {response.code}")


async def _follow(request: aiocoap.protocol.Request, on_notice: NoticeHandler) -> None:
    """Hand every notification of an observation to ``on_notice`` until it ends."""
    with contextlib.suppress(aiocoap.error.Error, OSError):
        async for response in request.observation:
            if not response.code.is_successful():
                return  # an error notification ends the observation (RFC 7641 3.2)
            if response.payload:
                on_notice(response.payload)


def _forget(request: aiocoap.protocol.Request) -> None:
    """Stop following an observation; aiocoap raises if it already ended, which is fine here."""
    with contextlib.suppress(Exception):
        request.observation.cancel()


# -- payload fetchers -------------------------------------------------------------------------


SUPPORTED_SCHEMES = ("http", "https", "coap")


def order_uris(uris: tuple[str, ...] | list[str], transport: str) -> list[str]:
    """Try-each order for a device: URIs of its own transport's family first, then the rest.

    CoAP devices prefer ``coap://``, MQTT devices ``http(s)://``; unsupported schemes are dropped.
    """
    preferred = ("coap",) if transport == "coap" else ("http", "https")
    usable = [u for u in uris if urlsplit(u).scheme in SUPPORTED_SCHEMES]
    return [u for u in usable if urlsplit(u).scheme in preferred] + [
        u for u in usable if urlsplit(u).scheme not in preferred
    ]


async def fetch_http(uri: str, offset: int, sink: Sink, *, timeout: float = 30.0) -> None:
    """GET ``uri`` from ``offset`` with ``Range: bytes=OFFSET-``; a 200 restarts at offset 0.

    A deliberately small HTTP/1.1 client (one request per connection, Content-Length or chunked
    bodies), as a constrained device has: a general-purpose client's connection pool costs more
    CPU than the transfer itself when thousands of simulated devices share one process.
    """
    u = urlsplit(uri)
    secure = u.scheme == "https"
    host, port = u.hostname or "127.0.0.1", u.port or (443 if secure else 80)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    try:
        reader, writer = await within(
            asyncio.open_connection(host, port, ssl=ssl.create_default_context() if secure else None), timeout
        )
    except (OSError, TimeoutError) as exc:
        raise FetchError(f"{uri}: cannot connect: {exc!r}") from None
    try:
        head = f"GET {target} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\nUser-Agent: fwcm-sim\r\n"
        if offset > 0:
            head += f"Range: bytes={offset}-\r\n"
        writer.write((head + "\r\n").encode("latin-1"))
        raw = await within(reader.readuntil(b"\r\n\r\n"), timeout)
        status, headers = _parse_head(raw)
        if status == 206:
            start = _content_range_start(headers.get("content-range", ""))
            if start is None:
                raise FetchError(f"206 without usable Content-Range from {uri}")
            pos = start
        elif status == 200:
            pos = 0
        elif status == 416:
            raise FetchError(f"{uri}: range {offset}- not satisfiable", status=416)
        elif status in (400, 401, 403, 404, 410):
            raise FetchError(f"{uri}: HTTP {status}", permanent=True, status=status)
        else:
            raise FetchError(f"{uri}: HTTP {status}", status=status)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            async for chunk in _chunks(reader, timeout):
                await sink(pos, chunk)
                pos += len(chunk)
            return
        length = int(headers.get("content-length", "-1"))
        received = 0
        while length < 0 or received < length:
            chunk = await within(reader.read(16384), timeout)
            if not chunk:
                break
            await sink(pos, chunk)
            pos += len(chunk)
            received += len(chunk)
        if 0 <= length != received:
            raise FetchError(f"{uri}: connection closed after {received} of {length} bytes")
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise FetchError(f"{uri}: {exc.__class__.__name__}: {exc}") from None
    finally:
        writer.close()


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """Status code and lower-cased headers of an HTTP/1.1 response head."""
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"not an HTTP response: {status_line[:40]!r}")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _chunks(reader: asyncio.StreamReader, timeout: float) -> AsyncIterator[bytes]:
    """Decode a chunked transfer-encoded body."""
    while True:
        size_line = await within(reader.readuntil(b"\r\n"), timeout)
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            await within(reader.readuntil(b"\r\n"), timeout)
            return
        yield await within(reader.readexactly(size), timeout)
        await within(reader.readexactly(2), timeout)


def _content_range_start(value: str) -> int | None:
    # "bytes START-END/TOTAL"
    try:
        unit, rng = value.split(" ", 1)
        if unit.strip().lower() != "bytes":
            return None
        return int(rng.split("-", 1)[0])
    except (ValueError, IndexError):
        return None


async def fetch_coap(
    ctx: aiocoap.Context, uri: str, offset: int, sink: Sink, *, timeout: float = 15.0
) -> None:
    """GET ``uri`` block by block (Block2), starting at the block that contains ``offset``.

    The blocks are requested one by one rather than through aiocoap's automatic assembly so that
    each block can be written and its offset persisted, which is what makes resuming possible.
    """
    szx = COAP_BLOCK_SZX
    block = offset // (1 << (szx + 4))
    while True:
        request = aiocoap.Message(code=Code.GET, uri=uri)
        request.opt.block2 = BlockOption.BlockwiseTuple(block, False, szx)
        try:
            response = await response_within(ctx.request(request, handle_blockwise=False), timeout)
        except (TimeoutError, aiocoap.error.Error, OSError) as exc:
            raise FetchError(f"{uri}: {exc!r}") from None
        if not response.code.is_successful():
            permanent = response.code in (Code.NOT_FOUND, Code.BAD_REQUEST, Code.UNAUTHORIZED, Code.FORBIDDEN)
            raise FetchError(f"{uri}: CoAP {response.code}", permanent=permanent, status=int(response.code))
        opt = response.opt.block2
        if opt is None:
            # Small payload answered in one piece.
            await sink(0, response.payload)
            return
        if not opt.is_valid_for_payload_size(len(response.payload)):
            raise FetchError(f"{uri}: block {opt.block_number} has {len(response.payload)} bytes")
        await sink(opt.start, response.payload)
        if not opt.more:
            return
        # The server may have answered with smaller blocks than asked; continue in its size.
        szx = opt.size_exponent
        block = (opt.start + len(response.payload)) // opt.size
