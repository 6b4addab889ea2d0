"""fwcm's CoAP site routes as aiocoap's does (both served over real UDP on loopback): the same
resource gets the same request, with the resource's path stripped and every other option kept."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import pytest
from aiocoap import resource
from aiocoap.message import Direction
from aiocoap.numbers.types import Type
from aiocoap.optiontypes import BlockOption

from fwcm.transport.broker import free_port
from fwcm.transport.coap import Site


class Plain(resource.Resource):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=self.name.encode(), **_seen(request))


class Nested(Plain, resource.PathCapable):
    pass


def _seen(request: aiocoap.Message) -> dict[str, Any]:
    """What a resource reads of its request, echoed in the response's options."""
    return {"location_path": request.opt.uri_path, "location_query": request.opt.uri_query}


def build(site: resource.Site) -> resource.Site:
    site.add_resource(["a", "b"], Plain("a/b"))
    site.add_resource(["p"], Nested("p"))
    site.add_resource(["x"], Nested("x"))
    site.add_resource(["x", "y"], Nested("x/y"))
    return site


def request(path: tuple[str, ...]) -> aiocoap.Message:
    msg = aiocoap.Message(code=aiocoap.GET, mtype=Type.CON, token=b"\x01\x02")
    msg.opt.uri_path = path
    msg.opt.uri_query = ("d=t/dev", "k=secret")
    msg.opt.block2 = BlockOption.BlockwiseTuple(3, False, 6)
    msg.mid = 4711
    msg.direction = Direction.INCOMING  # as decoded by the server
    return msg


PATHS = [
    ("a", "b"),
    ("p", "0" * 64),
    ("p", "one", "two"),
    ("x", "y", "z"),  # the longest prefix wins
    ("x", "q"),
    ("x", ""),  # a sub-site's root
    ("p",),  # no resource: 4.04
    ("nothing", "here"),
    (),
]


@pytest.fixture
async def servers() -> AsyncIterator[tuple[aiocoap.Context, int, int]]:
    """A client, and the same resources on fwcm's site and on aiocoap's (their ports)."""
    ports = [free_port(socket.SOCK_DGRAM) for _ in range(2)]
    contexts = [
        await aiocoap.Context.create_server_context(
            build(site), bind=("127.0.0.1", port), transports=["udp6"]
        )
        for site, port in zip((Site(), resource.Site()), ports, strict=True)
    ]
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        yield client, ports[0], ports[1]
    finally:
        for ctx in (client, *contexts):
            await ctx.shutdown()


async def get(client: aiocoap.Context, port: int, path: tuple[str, ...]) -> tuple[Any, ...]:
    msg = aiocoap.Message(code=aiocoap.GET, uri=f"coap://127.0.0.1:{port}")
    msg.opt.uri_path = path
    msg.opt.uri_query = ("d=t/dev", "k=secret")
    msg.opt.block2 = BlockOption.BlockwiseTuple(0, False, 6)
    r = await client.request(msg, handle_blockwise=False).response
    return r.code, r.payload, r.opt.location_path, r.opt.location_query


async def test_each_resource_sees_what_aiocoaps_site_shows_it(servers: Any) -> None:
    client, ours, theirs = servers
    for path in PATHS:
        assert await get(client, ours, path) == await get(client, theirs, path), path
    assert await get(client, ours, ("x", "y", "z")) == (
        aiocoap.CONTENT,
        b"x/y",
        ("z",),
        ("d=t/dev", "k=secret"),
    )
    assert (await get(client, ours, ("p",)))[0] == aiocoap.NOT_FOUND


def test_the_stripped_request_keeps_the_exchange_and_shares_nothing_it_changes() -> None:
    original = request(("p", "one", "two"))
    child, stripped = build(Site())._find_child_and_pathstripped_message(original)
    assert child.name == "p"
    assert stripped.opt.uri_path == ("one", "two")
    assert (stripped.mid, stripped.token, stripped.mtype, stripped.code) == (
        4711,
        b"\x01\x02",
        Type.CON,
        aiocoap.GET,
    )
    assert stripped.opt.block2 == original.opt.block2
    stripped.opt.uri_query = ()
    stripped.opt.block2 = None
    assert original.opt.uri_path == ("p", "one", "two")
    assert original.opt.uri_query == ("d=t/dev", "k=secret")
    assert original.opt.block2 is not None
