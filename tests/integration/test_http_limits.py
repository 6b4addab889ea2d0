"""The HTTP listener's limits against real sockets on loopback: request heads that never end,
bodies that stop, clients that stop reading, more connections than the cap, and the memory of a
server whose clients do not read (in a ``fwcm server`` process of its own, so its RSS is its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import uvicorn
from devicekit import firmware, free_port, wait_until

from fwcm.config import Settings
from fwcm.server.app import Server
from fwcm.server.http import HttpLimits, uvicorn_config
from fwcm.server.metrics import REGISTRY
from fwcm.store import tenants

MiB = 1024 * 1024
IMAGE = firmware(8 * MiB, seed=3)
SHA = hashlib.sha256(IMAGE).hexdigest()
SMALL_RCVBUF = 4096


def closed(reason: str) -> float:
    return REGISTRY.get_sample_value("fwcm_http_connections_closed_total", {"reason": reason}) or 0.0


def slow_socket() -> socket.socket:
    """A client socket with a small receive buffer, so a response it does not read stays with the
    server."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    return s


async def until_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    got = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), 30):
            got += chunk
    return bytes(got)


async def response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(": ") for h in lines[1:]) if k.lower() == "content-length"
    )
    return int(lines[0].split()[1]), await reader.readexactly(length)


@dataclass
class Listener:
    """The API of an in-process server (no MQTT or CoAP) behind a listener with ``limits``."""

    server: Server
    uv: uvicorn.Server
    port: int
    key: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connections(self) -> int:
        return len(self.uv.server_state.connections)

    async def open(
        self, sock: socket.socket | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if sock is None:
            return await asyncio.open_connection("127.0.0.1", self.port)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        return await asyncio.open_connection(sock=sock)

    async def slow_reader(self) -> asyncio.StreamWriter:
        """A client that asks for the image and reads only the response head."""
        reader, writer = await self.open(slow_socket())
        writer.write(f"GET /p/{SHA} HTTP/1.1\r\nHost: fwcm\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).startswith(b"HTTP/1.1 200")
        return writer

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, timeout=30)


@contextlib.asynccontextmanager
async def listening(tmp_path: Path, limits: HttpLimits) -> AsyncIterator[Listener]:
    settings = Settings(data_dir=tmp_path / "data", http_port=free_port())
    srv = Server(settings, enable_mqtt=False, enable_coap=False, enable_http=False)
    await srv.start()
    with srv.db.session() as s:
        _tenant, key = tenants.create_tenant(s, "acme", "Acme")
    uv = uvicorn.Server(uvicorn_config(srv.create_api(), "127.0.0.1", settings.http_port, limits))
    task = asyncio.create_task(uv.serve())
    try:
        await wait_until(lambda: uv.started or task.done(), 10, "the listener")
        listener = Listener(srv, uv, settings.http_port, key)
        async with listener.client() as http:
            r = await http.post("/api/v1/payloads", content=IMAGE, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code in (200, 201), r.text
        yield listener
    finally:
        uv.should_exit = True
        await asyncio.wait_for(task, 30)
        await srv.stop()


async def test_a_request_head_must_arrive_within_the_head_timeout(tmp_path: Path) -> None:
    limits = HttpLimits(head_timeout=0.5, idle_timeout=30, max_connections=8)
    async with listening(tmp_path, limits) as listener:
        before = closed("head_timeout")
        silent_r, _silent_w = await listener.open()
        drip_r, drip_w = await listener.open()

        async def drip() -> None:  # a head that never ends, one byte at a time
            for byte in f"GET /p/{SHA} HTTP/1.1\r\nHost: fwcm\r\nX-Pad: {'x' * 60}".encode():
                drip_w.write(bytes([byte]))
                await drip_w.drain()
                await asyncio.sleep(0.1)

        dripping = asyncio.create_task(drip())
        assert await until_eof(silent_r) == b""
        assert await until_eof(drip_r) == b""
        assert not dripping.done()  # cut off while it was still sending
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await dripping

        # On a kept-alive connection the next head is due within the timeout too.
        reader, writer = await listener.open()
        writer.write(f"GET /p/{SHA} HTTP/1.1\r\nHost: fwcm\r\nRange: bytes=0-9\r\n\r\n".encode())
        assert await response(reader) == (206, IMAGE[:10])
        writer.write(b"GET /p/")
        assert await until_eof(reader) == b""
        assert closed("head_timeout") - before == 3
        assert listener.connections() == 0


async def test_idle_connections_over_the_cap_make_room_for_requests(tmp_path: Path) -> None:
    limits = HttpLimits(head_timeout=60, idle_timeout=60, max_connections=8)
    async with listening(tmp_path, limits) as listener:
        before = closed("evicted")
        idle = [await listener.open() for _ in range(3 * limits.max_connections)]
        await wait_until(lambda: closed("evicted") - before == 2 * limits.max_connections, 30, "evictions")
        assert listener.connections() == limits.max_connections

        async with listener.client() as http:
            r = await http.get(f"/p/{SHA}", headers={"Range": "bytes=100-199"})
            assert r.status_code == 206 and r.content == IMAGE[100:200]
            oldest_first = [await until_eof(reader) for reader, _ in idle[: 2 * limits.max_connections + 1]]
            assert oldest_first == [b""] * len(oldest_first)

            for _reader, writer in idle:
                writer.close()
            await wait_until(lambda: listener.connections() <= 1, 30, "the idle clients to go")
            r = await http.get(f"/p/{SHA}")
            assert r.status_code == 200 and r.content == IMAGE


async def test_when_every_connection_is_busy_a_newcomer_gets_a_503(tmp_path: Path) -> None:
    limits = HttpLimits(head_timeout=60, idle_timeout=60, max_connections=4)
    async with listening(tmp_path, limits) as listener:
        readers = [await listener.slow_reader() for _ in range(limits.max_connections)]
        before = closed("refused")
        async with listener.client() as http:
            r = await http.get(f"/p/{SHA}")
            assert r.status_code == 503 and r.headers["connection"] == "close"
            assert closed("refused") - before == 1

            for writer in readers:
                writer.close()
            await wait_until(lambda: listener.connections() == 0, 30, "the slow readers to go")
            r = await http.get(f"/p/{SHA}")
            assert r.status_code == 200 and r.content == IMAGE
            r = await http.get(f"/p/{SHA}", headers={"Range": "bytes=70000-200000"})
            assert r.status_code == 206 and r.content == IMAGE[70000:200001]


async def test_transfers_that_stop_are_dropped_after_the_idle_timeout(tmp_path: Path) -> None:
    limits = HttpLimits(head_timeout=60, idle_timeout=1.0, max_connections=8)
    async with listening(tmp_path, limits) as listener:
        stalled, stopped = closed("stalled"), closed("body_timeout")
        reading = await listener.slow_reader()
        await wait_until(lambda: listener.connections() == 0, 30, "the reader that stopped to be dropped")
        assert closed("stalled") - stalled == 1
        reading.close()

        reader, writer = await listener.open()
        writer.write(
            f"POST /api/v1/payloads HTTP/1.1\r\nHost: fwcm\r\nAuthorization: Bearer {listener.key}\r\n"
            "Content-Length: 100000\r\n\r\n0123456789".encode()
        )
        assert await until_eof(reader) == b""
        assert closed("body_timeout") - stopped == 1
        async with listener.client() as http:  # nothing was stored, the server serves on
            r = await http.get("/api/v1/payloads", headers={"Authorization": f"Bearer {listener.key}"})
            assert r.status_code == 200 and [p["sha256"] for p in r.json()["items"]] == [SHA]


async def test_an_application_slow_to_read_a_body_does_not_cut_off_the_client(tmp_path: Path) -> None:
    """uvicorn stops reading while the application is behind: that silence is the server's, so a
    client that sent its body on time gets its answer however long the application takes."""

    async def slow_app(scope, receive, send):  # type: ignore[no-untyped-def]
        size, more = 0, True
        while more:
            await asyncio.sleep(0.3)  # far behind the client: every pause outlasts the idle timeout
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})

    port = free_port()
    limits = HttpLimits(head_timeout=60, idle_timeout=0.2, max_connections=8)
    uv = uvicorn.Server(uvicorn_config(slow_app, "127.0.0.1", port, limits))
    task = asyncio.create_task(uv.serve())
    try:
        await wait_until(lambda: uv.started or task.done(), 10, "the listener")
        stopped = closed("body_timeout")
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(f"http://127.0.0.1:{port}/", content=IMAGE[: 2 * MiB])
        assert r.status_code == 200 and int(r.text) == 2 * MiB
        assert closed("body_timeout") == stopped
    finally:
        uv.should_exit = True
        await asyncio.wait_for(task, 30)


# -- a `fwcm server` process --------------------------------------------------------------------


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    key: str

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)


def _descriptors(n: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (n if hard == resource.RLIM_INFINITY else min(n, hard), hard))


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """``fwcm server --no-mqtt --no-coap`` with 4,096 descriptors and the image uploaded."""
    port = free_port()
    env = dict(
        os.environ,
        FWCM_DATA_DIR=str(tmp_path / "server"),
        FWCM_HTTP_BIND=f"127.0.0.1:{port}",
        FWCM_COAP_BIND=f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
    )
    cli = [sys.executable, "-m", "fwcm.cli"]
    out = subprocess.run(
        [*cli, "admin", "tenant-create", "acme", "--json"], env=env, capture_output=True, check=True
    )
    key = json.loads(out.stdout.strip().splitlines()[-1])["api_key"]
    with (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [*cli, "server", "--no-mqtt", "--no-coap", "--replica", "limits"],
            env=env,
            stderr=log,
            preexec_fn=lambda: _descriptors(4096),
        )
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}
        ) as http:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                with contextlib.suppress(httpx.HTTPError):
                    if http.get("/api/v1/tenant").status_code == 200:
                        break
                assert time.monotonic() < deadline, "fwcm server did not answer"
                time.sleep(0.1)
            http.post("/api/v1/payloads", content=IMAGE, timeout=60).raise_for_status()
            assert http.get(f"/p/{SHA}").content == IMAGE  # now in the payload cache
        yield ServerProcess(proc, port, key)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_clients_that_do_not_read_cost_the_server_little_memory(server_process: ServerProcess) -> None:
    """300 clients ask for the 8 MiB image and read nothing: the server's RSS grows by at most
    100 MB (it held a copy of the image per client before), and it serves on."""
    before = server_process.rss()
    clients = []
    try:
        for _ in range(300):
            s = slow_socket()
            s.settimeout(30)
            s.connect(("127.0.0.1", server_process.port))
            s.sendall(f"GET /p/{SHA} HTTP/1.1\r\nHost: fwcm\r\n\r\n".encode())
            clients.append(s)
        for s in clients:  # every response has begun: the server has written what it could
            assert s.recv(12, socket.MSG_PEEK).startswith(b"HTTP/1.1 200")
        peak = 0
        for _ in range(5):  # a few samples while they hold on
            time.sleep(0.2)
            peak = max(peak, server_process.rss())
        assert peak - before <= 100 * MiB, f"RSS grew by {(peak - before) / MiB:.0f} MB"
    finally:
        for s in clients:
            s.close()
    with httpx.Client(base_url=f"http://127.0.0.1:{server_process.port}", timeout=30) as http:
        r = http.get(f"/p/{SHA}", headers={"Range": "bytes=-5"})
        assert r.status_code == 206 and r.content == IMAGE[-5:]


def test_the_server_command_cuts_off_a_silent_connection(server_process: ServerProcess) -> None:
    """`fwcm server` runs its listener with the default limits: a connection that sends nothing
    is closed (after 5 s), and the server serves on."""
    with socket.create_connection(("127.0.0.1", server_process.port), timeout=30) as s:
        assert s.recv(1) == b""
    with httpx.Client(base_url=f"http://127.0.0.1:{server_process.port}", timeout=30) as http:
        assert http.get(f"/p/{SHA}", headers={"Range": "bytes=0-0"}).content == IMAGE[:1]
