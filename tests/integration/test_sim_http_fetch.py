"""The simulator's small HTTP client against hand-written responses on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from device_sim.transports import FetchError, fetch_http


@pytest.fixture
async def server() -> AsyncIterator[tuple[list[bytes], list[bytes]]]:
    """Answers each connection with the next canned response; records the requests."""
    responses: list[bytes] = []
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(responses.pop(0))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    responses.append(str(port).encode())  # the test reads the port from here
    yield responses, requests
    srv.close()
    await srv.wait_closed()


async def fetch(uri: str, offset: int = 0) -> bytes:
    got = bytearray()

    async def sink(pos: int, chunk: bytes) -> None:
        assert pos == offset + len(got)
        got.extend(chunk)

    await fetch_http(uri, offset, sink, timeout=5)
    return bytes(got)


async def test_chunked_body_and_range_header(server: tuple[list[bytes], list[bytes]]) -> None:
    responses, requests = server
    port = int(responses.pop(0))
    responses.append(
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 3-9/10\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4;x=1\r\ndefg\r\n0\r\n\r\n"
    )
    assert await fetch(f"http://127.0.0.1:{port}/p/x", offset=3) == b"abcdefg"
    assert b"Range: bytes=3-" in requests[0] and requests[0].startswith(b"GET /p/x HTTP/1.1")


async def test_short_body_and_errors_raise_fetch_error(server: tuple[list[bytes], list[bytes]]) -> None:
    responses, _requests = server
    port = int(responses.pop(0))
    responses.append(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(FetchError, match="after 3 of 10 bytes"):
        await fetch(f"http://127.0.0.1:{port}/p/x")
    responses.append(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(FetchError) as e:
        await fetch(f"http://127.0.0.1:{port}/p/x")
    assert e.value.permanent
    responses.append(b"garbage\r\n\r\n")
    with pytest.raises(FetchError, match="not an HTTP response"):
        await fetch(f"http://127.0.0.1:{port}/p/x")
