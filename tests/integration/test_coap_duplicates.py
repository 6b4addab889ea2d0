"""The CoAP message layer's duplicate memory, bounded by count: over real UDP on loopback, a
retransmitted confirmable request is answered from memory while it is among the newest
exchanges, and run again (fwcm's resources are idempotent) once newer ones pushed it out."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiocoap
from aiocoap import resource

from fwcm.transport.broker import free_port
from fwcm.transport.coap import bound_duplicate_memory


class Counting(resource.Resource):
    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self.runs += 1
        return aiocoap.Message(payload=str(self.runs).encode())


def con_get(mid: int) -> bytes:
    m = aiocoap.Message(code=aiocoap.GET, mtype=aiocoap.CON, mid=mid, token=mid.to_bytes(2, "big"))
    m.opt.uri_path = ("c",)
    return bytes(m.encode())


async def exchange(sock: socket.socket, port: int, mid: int) -> bytes:
    sock.sendto(con_get(mid), ("127.0.0.1", port))
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 2048), 5)
    answer: Any = aiocoap.Message.decode(data)
    assert answer.mid == mid and answer.code == aiocoap.CONTENT
    return bytes(answer.payload)


async def test_a_retransmission_is_answered_from_memory_until_newer_exchanges_push_it_out() -> None:
    site = resource.Site()
    counting = Counting()
    site.add_resource(["c"], counting)
    port = free_port(socket.SOCK_DGRAM)
    ctx = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port), transports=["udp6"])
    bound_duplicate_memory(ctx, 2)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        assert await exchange(sock, port, 100) == b"1"
        assert await exchange(sock, port, 100) == b"1"  # a retransmission: the same answer, not run
        assert counting.runs == 1
        assert await exchange(sock, port, 101) == b"2"
        assert await exchange(sock, port, 102) == b"3"  # the memory holds 101 and 102 now
        assert await exchange(sock, port, 100) == b"4"  # forgotten: run again
        assert await exchange(sock, port, 102) == b"3"  # still remembered
        assert counting.runs == 4
    finally:
        sock.close()
        await ctx.shutdown()
