"""The kit's payload servers: HTTP (``GET /p/{sha256}`` with ``Range``) and CoAP Block2, both
bound to loopback by default, each able to misbehave the way a scenario needs.

A payload is published under the SHA-256 the manifest states; what is served for it can differ:

* ``tampered`` — other bytes of the same length (the device must fail the digest check);
* ``drop_at`` — the transfer breaks once after this many bytes (HTTP: the connection closes
  mid-body; CoAP: the block holding that offset is answered 5.03 once), so the device must resume;
* ``gate`` — the transfer stalls at the middle until the gate opens, so a scenario can act while
  the device is certainly downloading.

Every request is recorded as a :class:`Fetch`, which is what scenarios judge resumption by.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field

import aiocoap
from aiocoap import resource
from aiocoap.numbers.codes import Code

from fwcm import protocol

log = logging.getLogger(__name__)

HTTP_HEAD_BYTES = 8192
"""A request head larger than this is refused (the kit reads nothing unbounded)."""
IO_TIMEOUT_S = 30.0
"""How long a connection may stay silent, and a gate stay closed, before the kit gives up on it."""
COAP_BLOCK_BYTES = 1024


@dataclass(frozen=True)
class Fetch:
    """One payload request: over which transport, of which payload, from which byte."""

    transport: str
    sha: str
    start: int
    at: float


@dataclass
class Payload:
    """What is served under one digest, and how."""

    data: bytes
    drop_at: int | None = None
    gate: asyncio.Event | None = None
    dropped: bool = False
    dropped_when: float = 0.0
    """When the transfer was broken (``time.monotonic``): later requests must resume."""

    def drop(self) -> None:
        self.dropped = True
        self.dropped_when = time.monotonic()

    @property
    def gate_at(self) -> int:
        return len(self.data) // 2


@dataclass
class PayloadStore:
    payloads: dict[str, Payload] = field(default_factory=dict)
    fetches: list[Fetch] = field(default_factory=list)

    def publish(
        self,
        image: bytes,
        *,
        tampered: bool = False,
        drop_at: int | None = None,
        gate: asyncio.Event | None = None,
    ) -> str:
        """Serve ``image`` under its SHA-256 (altered when ``tampered``); return the hex digest."""
        sha = hashlib.sha256(image).hexdigest()
        data = image
        if tampered:
            i = len(image) // 2
            data = image[:i] + bytes([image[i] ^ 0xFF]) + image[i + 1 :]
        self.payloads[sha] = Payload(data, drop_at=drop_at, gate=gate)
        return sha

    def record(self, transport: str, sha: str, start: int) -> None:
        self.fetches.append(Fetch(transport, sha, start, time.monotonic()))

    def of(self, sha: str) -> list[Fetch]:
        return [f for f in self.fetches if f.sha == sha]


async def _wait_gate(gate: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(gate.wait(), IO_TIMEOUT_S)


class HttpPayloadServer:
    """``GET /p/{sha256}``: 200, or 206 for ``Range: bytes=N-``, 416 past the end, 404 unknown."""

    def __init__(self, store: PayloadStore, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = store
        self.host = host
        self.port = port
        self.advertised = host
        self._server: asyncio.Server | None = None

    def url(self, sha: str) -> str:
        return f"http://{self.advertised}:{self.port}{protocol.payload_path(sha)}"

    async def __aenter__(self) -> HttpPayloadServer:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT_S)
            if len(head) > HTTP_HEAD_BYTES:
                raise ValueError("request head too large")
            await self._answer(head, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except ValueError as exc:
            log.info("bad payload request: %s", exc)
            with contextlib.suppress(ConnectionError):
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> None:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:]) if v}
        path = target.split("?", 1)[0]
        sha = path.removeprefix("/p/")
        payload = self.store.payloads.get(sha) if method == "GET" and path.startswith("/p/") else None
        if payload is None:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        data = payload.data
        rng = headers.get("range", "")
        start = (
            int(rng[6:-1]) if rng.startswith("bytes=") and rng.endswith("-") and rng[6:-1].isdigit() else 0
        )
        self.store.record("http", sha, start)
        if start >= len(data) and start > 0:
            writer.write(
                f"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len(data)}\r\n"
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            return
        status = "206 Partial Content" if rng else "200 OK"
        extra = f"Content-Range: bytes {start}-{len(data) - 1}/{len(data)}\r\n" if rng else ""
        writer.write(
            f'HTTP/1.1 {status}\r\nContent-Length: {len(data) - start}\r\nETag: "{sha}"\r\n'
            f"Accept-Ranges: bytes\r\n{extra}Connection: close\r\n\r\n".encode()
        )
        end = len(data)
        if payload.drop_at is not None and not payload.dropped and start < payload.drop_at:
            payload.drop()
            end = payload.drop_at  # the connection closes mid-body: the device must resume
        pos = start
        while pos < end:
            if payload.gate is not None and pos < payload.gate_at <= pos + 8192:
                chunk_end = payload.gate_at
                writer.write(data[pos:chunk_end])
                await writer.drain()
                pos = chunk_end
                await _wait_gate(payload.gate)
                if payload.gate.is_set() and pos < end:
                    continue
                return
            writer.write(data[pos : min(pos + 8192, end)])
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT_S)
            pos = min(pos + 8192, end)


class _CoapPayloads(resource.Resource, resource.PathCapable):
    """``/p/{sha256}`` block by block (Block2, 1024 bytes), recording where each request starts."""

    def __init__(self, store: PayloadStore) -> None:
        super().__init__()
        self.store = store

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        path = request.opt.uri_path
        payload = self.store.payloads.get(path[0]) if len(path) == 1 else None
        if payload is None:
            return aiocoap.Message(code=Code.NOT_FOUND)
        b2 = request.opt.block2
        number, szx = (b2.block_number, min(b2.size_exponent, 6)) if b2 is not None else (0, 6)
        size = 1 << (szx + 4)
        start = number * size
        self.store.record("coap", path[0], start)
        if payload.drop_at is not None and not payload.dropped and start <= payload.drop_at < start + size:
            payload.drop()
            return aiocoap.Message(code=Code.SERVICE_UNAVAILABLE)
        if payload.gate is not None and start <= payload.gate_at < start + size:
            await _wait_gate(payload.gate)
        whole = aiocoap.Message(code=Code.CONTENT, payload=payload.data)
        if b2 is None and len(payload.data) <= COAP_BLOCK_BYTES:
            return whole
        block: aiocoap.Message = whole._extract_block(number, szx, COAP_BLOCK_BYTES)
        return block


def coap_payload_resource(store: PayloadStore) -> resource.Resource:
    return _CoapPayloads(store)
