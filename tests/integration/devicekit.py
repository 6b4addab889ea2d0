"""Test scaffolding for the device simulator: the server side of the wire, and nothing more.

A real Mosquitto (or the embedded broker) with device accounts, a small asyncio HTTP payload
server with Range support, and a small aiocoap server (observable notices, status POSTs, Block2
payloads) let the agent be tested without the fwcm server.  Every server records what it saw so
tests can assert on the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import aiomqtt
from aiocoap import resource
from aiocoap.numbers.codes import Code

from device_sim.agent import DeviceConfig
from fwcm import manifest, protocol
from fwcm.protocol import Notice, NoticeKind, Report
from fwcm.transport.accounts import Credentials
from fwcm.transport.broker import Broker
from fwcm.transport.mqtt import MqttSettings

TENANT = "acme"
VENDOR = manifest.vendor_id_for_domain("example.com")
CLASS = manifest.class_id_for(VENDOR, "sensor-v1")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


# -- reports ----------------------------------------------------------------------------------


@dataclass
class ReportLog:
    """Reports received by a test server, decoded with the device secrets, duplicates kept apart."""

    secrets: dict[str, bytes]
    reports: dict[str, list[Report]] = field(default_factory=lambda: defaultdict(list))
    duplicates: int = 0
    rejected: int = 0

    def add(self, device: str, data: bytes) -> bool:
        secret = self.secrets.get(device)
        if secret is None:
            self.rejected += 1
            return False
        try:
            report = protocol.decode_report(data, secret)
        except protocol.ProtocolError:
            self.rejected += 1
            return False
        seen = self.reports[device]
        if any((r.campaign, r.attempt, r.seq) == (report.campaign, report.attempt, report.seq) for r in seen):
            self.duplicates += 1
        else:
            seen.append(report)
        return True

    def campaign(self, device: str, campaign: int) -> list[Report]:
        return [r for r in self.reports[device] if r.campaign == campaign]

    def final(self, device: str, campaign: int) -> Report | None:
        """The terminal report (IDLE with a result) of the latest attempt, if any."""
        done = [
            r
            for r in self.campaign(device, campaign)
            if r.state == protocol.LwState.IDLE and r.result != protocol.Result.INITIAL
        ]
        return max(done, key=lambda r: (r.attempt, r.seq)) if done else None

    def hellos(self, device: str) -> list[Report]:
        return self.campaign(device, 0)


# -- MQTT server side -------------------------------------------------------------------------


class MqttServerSide:
    """Publishes retained notices and collects status reports, like the fwcm server would, on the
    broker's service account; gives the devices their accounts as the server would."""

    def __init__(self, broker: Broker, log: ReportLog) -> None:
        self.broker = broker
        self.settings = MqttSettings.from_url(broker.service_url)
        self.log = log
        self.accounts: dict[str, Credentials] = {}
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def admit(self, configs: list[DeviceConfig]) -> None:
        """Give these devices broker accounts (keeping those given before)."""
        for cfg in configs:
            self.accounts[cfg.name] = Credentials(*cfg.mqtt_credentials())
        await asyncio.to_thread(self.broker.admit, list(self.accounts.values()))

    async def __aenter__(self) -> MqttServerSide:
        s = self.settings
        self._client = aiomqtt.Client(
            s.host,
            s.port,
            identifier=f"test-server-{uuid.uuid4().hex[:8]}",
            username=s.username,
            password=s.password,
            protocol=aiomqtt.ProtocolVersion.V5 if s.version == 5 else aiomqtt.ProtocolVersion.V311,
        )
        await self._client.__aenter__()
        await self._client.subscribe(protocol.STATUS_SUBSCRIPTION, qos=1)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self._client is not None
        async for msg in self._client.messages:
            _tenant, device, _leaf = protocol.parse_device_topic(str(msg.topic))
            if isinstance(msg.payload, bytes):
                self.log.add(device, msg.payload)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    async def notify(self, tenant: str, device: str, sealed: bytes) -> None:
        assert self._client is not None
        await self._client.publish(protocol.notice_topic(tenant, device), sealed, qos=1, retain=True)


# -- HTTP payload server ----------------------------------------------------------------------


class PayloadHttpServer:
    """``GET /p/{sha256}`` with ``Range: bytes=N-`` (206) and ETag; records every request."""

    def __init__(self) -> None:
        self.payloads: dict[str, bytes] = {}
        self.requests: list[tuple[str, int | None]] = []
        """(path, range start or None) per request."""
        self._server: asyncio.Server | None = None
        self.port = 0

    def add(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.payloads[sha] = data
        return sha

    def url(self, sha: str) -> str:
        return f"http://127.0.0.1:{self.port}{protocol.payload_path(sha)}"

    async def __aenter__(self) -> PayloadHttpServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)
            }
            start: int | None = None
            rng = headers.get("range")
            if rng and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[6:-1])
            self.requests.append((path, start))
            sha = path.rsplit("/", 1)[-1]
            data = self.payloads.get(sha) if method == "GET" and path.startswith("/p/") else None
            if data is None:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            elif start is not None and start >= len(data):
                writer.write(
                    f"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len(data)}\r\n"
                    "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
                )
            else:
                body = data[start or 0 :]
                status = "206 Partial Content" if start is not None else "200 OK"
                extra = (
                    f"Content-Range: bytes {start}-{len(data) - 1}/{len(data)}\r\n"
                    if start is not None
                    else ""
                )
                writer.write(
                    f'HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nETag: "{sha}"\r\n'
                    f"Accept-Ranges: bytes\r\n{extra}Connection: close\r\n\r\n".encode()
                )
                for i in range(0, len(body), 8192):
                    writer.write(body[i : i + 8192])
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# -- CoAP server ------------------------------------------------------------------------------


def _two(request: aiocoap.Message) -> tuple[str, str] | None:
    path = request.opt.uri_path
    return (path[0], path[1]) if len(path) == 2 else None


class _Notices(resource.ObservableResource, resource.PathCapable):
    def __init__(self, current: dict[tuple[str, str], bytes]) -> None:
        super().__init__()
        self.current = current
        self.observers: dict[tuple[str, str], set[Any]] = defaultdict(set)
        self.registrations: list[tuple[str, str]] = []

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        key = _two(request)
        if key is None:
            return
        self.observers[key].add(serverobservation)
        self.registrations.append(key)
        serverobservation.accept(lambda: self.observers[key].discard(serverobservation))

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        key = _two(request)
        if key is None:
            return aiocoap.Message(code=Code.NOT_FOUND)
        return aiocoap.Message(code=Code.CONTENT, payload=self.current.get(key, b""))


class _Status(resource.Resource, resource.PathCapable):
    def __init__(self, log: ReportLog) -> None:
        super().__init__()
        self.log = log
        self.unavailable = 0
        """Answer this many next POSTs with 5.03 (the device must retry until it gets 2.04)."""
        self.posts = 0

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        self.posts += 1
        key = _two(request)
        if key is None:
            return aiocoap.Message(code=Code.NOT_FOUND)
        if self.unavailable > 0:
            self.unavailable -= 1
            return aiocoap.Message(code=Code.SERVICE_UNAVAILABLE)
        if key[1] not in self.log.secrets:
            return aiocoap.Message(code=Code.NOT_FOUND)
        if not self.log.add(key[1], request.payload):
            return aiocoap.Message(code=Code.UNAUTHORIZED)
        return aiocoap.Message(code=Code.CHANGED)


class _Payloads(resource.Resource, resource.PathCapable):
    """Serves Block2 itself so the test can see which block each request starts at."""

    def __init__(self, payloads: dict[str, bytes], blocks: list[tuple[str, int]]) -> None:
        super().__init__()
        self.payloads = payloads
        self.blocks = blocks

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        path = request.opt.uri_path
        data = self.payloads.get(path[0]) if len(path) == 1 else None
        if data is None:
            return aiocoap.Message(code=Code.NOT_FOUND)
        whole = aiocoap.Message(code=Code.CONTENT, payload=data)
        b2 = request.opt.block2
        number, szx = (b2.block_number, min(b2.size_exponent, 6)) if b2 is not None else (0, 6)
        self.blocks.append((path[0], number * (1 << (szx + 4))))
        if b2 is None and len(data) <= 1024:
            return whole
        response: aiocoap.Message = whole._extract_block(number, szx, 1024)
        return response


class CoapTestServer:
    """``/n/{t}/{d}`` observable, ``/s/{t}/{d}`` status, ``/p/{sha}`` Block2 payloads on UDP loopback."""

    def __init__(self, log: ReportLog, payloads: dict[str, bytes]) -> None:
        self.log = log
        self.current: dict[tuple[str, str], bytes] = {}
        self.blocks: list[tuple[str, int]] = []
        """(sha, byte offset) of every payload block requested."""
        self.notices = _Notices(self.current)
        self.status = _Status(log)
        self.payloads = payloads
        self.port = free_port(socket.SOCK_DGRAM)
        self._ctx: aiocoap.Context | None = None

    @property
    def url(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    def payload_url(self, sha: str) -> str:
        return f"{self.url}{protocol.payload_path(sha)}"

    async def __aenter__(self) -> CoapTestServer:
        site = resource.Site()
        site.add_resource(["n"], self.notices)
        site.add_resource(["s"], self.status)
        site.add_resource(["p"], _Payloads(self.payloads, self.blocks))
        self._ctx = await aiocoap.Context.create_server_context(
            site, bind=("127.0.0.1", self.port), transports=["udp6"]
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ctx is not None:
            await self._ctx.shutdown()

    def notify(self, tenant: str, device: str, sealed: bytes) -> None:
        self.current[(tenant, device)] = sealed
        for obs in list(self.notices.observers.get((tenant, device), ())):
            obs.trigger()


# -- devices, keys, manifests -----------------------------------------------------------------


@dataclass
class Signer:
    key: Any = field(default_factory=lambda: manifest.generate_private_key("es256"))

    @property
    def public_pem(self) -> bytes:
        return manifest.public_key_pem(self.key)

    def envelope(
        self,
        image: bytes,
        uris: list[str],
        *,
        sequence: int = 2,
        vendor: uuid.UUID = VENDOR,
        cls: uuid.UUID = CLASS,
        size: int | None = None,
    ) -> bytes:
        info = manifest.ManifestInfo(
            sequence=sequence,
            vendor_id=vendor,
            class_id=cls,
            image_digest=hashlib.sha256(image).digest(),
            image_size=len(image) if size is None else size,
            uris=tuple(uris),
        )
        return manifest.build_envelope(info, self.key)

    def delta_envelope(
        self, base: bytes, new: bytes, patch: bytes, uris: list[str], *, sequence: int = 2
    ) -> bytes:
        """An envelope for ``new`` made by applying ``patch`` (fetched from ``uris``) to ``base``."""
        info = manifest.ManifestInfo(
            sequence=sequence,
            vendor_id=VENDOR,
            class_id=CLASS,
            image_digest=hashlib.sha256(new).digest(),
            image_size=len(new),
            uris=(),
            delta=manifest.DeltaPatch(
                hashlib.sha256(base).digest(),
                len(base),
                hashlib.sha256(patch).digest(),
                len(patch),
                tuple(uris),
            ),
        )
        return manifest.build_envelope(info, self.key)

    def multi_envelope(self, images: list[tuple[bytes, bytes, list[str]]], *, sequence: int = 2) -> bytes:
        """One envelope for several (component name, image, URIs), the first being the main image."""
        parts = [
            manifest.Component((name,), hashlib.sha256(image).digest(), len(image), tuple(uris))
            for name, image, uris in images
        ]
        info = manifest.ManifestInfo(
            sequence=sequence,
            vendor_id=VENDOR,
            class_id=CLASS,
            image_digest=parts[0].image_digest,
            image_size=parts[0].image_size,
            uris=parts[0].uris,
            component_id=parts[0].id,
            extra_components=tuple(parts[1:]),
        )
        return manifest.build_envelope(info, self.key)


def device_config(
    name: str,
    *,
    transport: str,
    trust: list[bytes],
    state_dir: Path,
    mqtt_url: str = "mqtt://127.0.0.1:1",
    coap_url: str = "coap://127.0.0.1:1",
    installed_sequence: int = 1,
    index: int = 0,
    cls: uuid.UUID = CLASS,
) -> DeviceConfig:
    return DeviceConfig(
        name=name,
        tenant=TENANT,
        secret=hashlib.sha256(name.encode()).digest(),
        vendor_id=VENDOR,
        class_id=cls,
        transport="coap" if transport == "coap" else "mqtt",
        trust_anchors=trust,
        state_dir=state_dir,
        mqtt_url=mqtt_url,
        coap_url=coap_url,
        installed_sequence=installed_sequence,
        index=index,
    )


def update_notice(cfg: DeviceConfig, campaign: int, envelope: bytes, *, attempt: int = 1, **kw: Any) -> bytes:
    n = Notice(NoticeKind.UPDATE, cfg.name, campaign, attempt, int(time.time()), envelope=envelope, **kw)
    return protocol.encode_notice(cfg.secret, n)


def cancel_notice(cfg: DeviceConfig, campaign: int, *, attempt: int = 1) -> bytes:
    n = Notice(NoticeKind.CANCEL, cfg.name, campaign, attempt, int(time.time()))
    return protocol.encode_notice(cfg.secret, n)


def firmware(size: int, seed: int = 1) -> bytes:
    """Deterministic pseudo-random image bytes."""
    out = bytearray()
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


@contextlib.asynccontextmanager
async def running(agents: list[Any]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run agents as tasks; stop them and wait on exit."""
    tasks = [asyncio.create_task(a.run()) for a in agents]
    try:
        yield tasks
    finally:
        for a in agents:
            a.stop()
        _done, pending = await asyncio.wait(tasks, timeout=10)
        for t in pending:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
