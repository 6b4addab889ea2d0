"""CoAP adapter of the server (aiocoap).

Resources (see docs/protocol.md):
  ``/n/{tenant}/{device}``  observable notice; an empty 2.05 means "nothing to do"
  ``/s/{tenant}/{device}``  POST a sealed status report; 2.04 once it is durable
  ``/p/{sha256}``           payload bytes, Block2
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import aiocoap
from aiocoap import resource
from aiocoap.numbers.codes import Code

from fwcm import protocol
from fwcm.protocol import ProtocolError
from fwcm.transport.inbound import Inbound

log = logging.getLogger(__name__)

NoticeSource = Callable[[str, str], Awaitable[bytes | None]]
PayloadSource = Callable[[str], Awaitable[bytes | None]]
RefusalSource = Callable[[str, dict[str, str], str], Awaitable[str | None]]
"""(sha256, query, transport) → why a payload fetch is refused (4.01), or None."""

_REFUSAL_CODES = {
    "oversized": Code.REQUEST_ENTITY_TOO_LARGE,
    "mac": Code.UNAUTHORIZED,
    "unknown_device": Code.NOT_FOUND,
    "forbidden": Code.FORBIDDEN,
}
ACK_TIMEOUT_S = 30.0


def _two_segments(request: aiocoap.Message) -> tuple[str, str] | None:
    path = request.opt.uri_path
    if len(path) != 2 or not all(protocol.NAME_RE.match(p) for p in path):
        return None
    return path[0], path[1]


class NoticeResource(resource.ObservableResource, resource.PathCapable):
    """One observable notice per device, addressed by the rest of the path."""

    def __init__(self, source: NoticeSource) -> None:
        super().__init__()
        self._source = source
        self._observers: dict[tuple[str, str], set[Any]] = defaultdict(set)

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        key = _two_segments(request)
        if key is None:
            return
        self._observers[key].add(serverobservation)

        def _cancel() -> None:
            self._observers[key].discard(serverobservation)
            if not self._observers[key]:
                del self._observers[key]

        serverobservation.accept(_cancel)

    def notify(self, tenant: str, device: str) -> bool:
        """Re-render the notice for the device's observers; False if nobody observes it."""
        observers = self._observers.get((tenant, device))
        for obs in list(observers or ()):
            obs.trigger()
        return bool(observers)

    @property
    def observer_count(self) -> int:
        return sum(len(v) for v in self._observers.values())

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        key = _two_segments(request)
        if key is None:
            return aiocoap.Message(code=Code.NOT_FOUND)
        payload = await self._source(*key)
        return aiocoap.Message(code=Code.CONTENT, payload=payload or b"")


class StatusResource(resource.Resource, resource.PathCapable):
    """Receives sealed reports; answers only after the report is durable (or refused)."""

    def __init__(self, deliver: Callable[[Inbound], None]) -> None:
        super().__init__()
        self._deliver = deliver

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False  # a report fits one datagram; block-wise uploads are refused as oversized

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        key = _two_segments(request)
        if key is None:
            return aiocoap.Message(code=Code.NOT_FOUND)
        if request.opt.block1 is not None or len(request.payload) > protocol.MAX_REPORT_BYTES:
            self._deliver(_refused(key, "oversized"))
            return aiocoap.Message(code=Code.REQUEST_ENTITY_TOO_LARGE)
        done: asyncio.Future[ProtocolError | None] = asyncio.get_running_loop().create_future()

        def on_done(err: ProtocolError | None) -> None:
            if not done.done():
                done.get_loop().call_soon_threadsafe(_set_result, done, err)

        self._deliver(
            Inbound(
                transport="coap",
                kind="status",
                tenant=key[0],
                device=key[1],
                payload=request.payload,
                on_done=on_done,
            )
        )
        try:
            err = await asyncio.wait_for(done, ACK_TIMEOUT_S)
        except TimeoutError:
            return aiocoap.Message(code=Code.SERVICE_UNAVAILABLE)
        if err is None:
            return aiocoap.Message(code=Code.CHANGED)
        code = _REFUSAL_CODES.get(err.reason, Code.BAD_REQUEST)
        return aiocoap.Message(code=code, payload=str(err).encode()[:100])


def _set_result(fut: asyncio.Future[ProtocolError | None], err: ProtocolError | None) -> None:
    if not fut.done():
        fut.set_result(err)


def _refused(key: tuple[str, str], reason: str) -> Inbound:
    """An Inbound that only counts a refusal made at the transport (nothing to decode)."""
    return Inbound(
        transport="coap",
        kind="refused:" + reason,
        tenant=key[0],
        device=key[1],
        payload=b"",
        on_done=lambda _e: None,
    )


class PayloadResource(resource.Resource, resource.PathCapable):
    """Payload bytes by SHA-256; aiocoap slices the response into Block2 blocks."""

    def __init__(self, source: PayloadSource, refusal: RefusalSource | None = None) -> None:
        super().__init__()
        self._source = source
        self._refusal = refusal

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        path = request.opt.uri_path
        if len(path) != 1 or len(path[0]) != 64:
            return aiocoap.Message(code=Code.NOT_FOUND)
        if self._refusal is not None:
            query = dict(q.partition("=")[::2] for q in request.opt.uri_query)
            refused = await self._refusal(path[0].lower(), query, "coap")
            if refused is not None:
                return aiocoap.Message(code=Code.UNAUTHORIZED, payload=refused.encode()[:100])
        data = await self._source(path[0].lower())
        if data is None:
            return aiocoap.Message(code=Code.NOT_FOUND)
        msg = aiocoap.Message(code=Code.CONTENT, payload=data)
        msg.opt.etag = bytes.fromhex(path[0])[:8]
        return msg


class CoapTransport:
    """Serves the CoAP resources on one UDP socket."""

    def __init__(
        self,
        bind: tuple[str, int],
        deliver: Callable[[Inbound], None],
        notices: NoticeSource,
        payloads: PayloadSource,
        refusal: RefusalSource | None = None,
    ) -> None:
        self.bind = bind
        self.notices = NoticeResource(notices)
        site = resource.Site()
        site.add_resource(["n"], self.notices)
        site.add_resource(["s"], StatusResource(deliver))
        site.add_resource(["p"], PayloadResource(payloads, refusal))
        self._site = site
        self._context: aiocoap.Context | None = None

    async def start(self) -> None:
        self._context = await aiocoap.Context.create_server_context(
            self._site, bind=self.bind, transports=["udp6"]
        )
        log.info("CoAP listening on %s:%d", *self.bind)

    async def stop(self) -> None:
        if self._context is not None:
            await self._context.shutdown()
            self._context = None

    def notify(self, tenant: str, device: str) -> bool:
        return self.notices.notify(tenant, device)
