"""CoAP adapter of the server (aiocoap).

Resources (see docs/protocol.md):
  ``/n/{tenant}/{device}?k=CRED``  observable notice; an empty 2.05 means "nothing to do"
  ``/s/{tenant}/{device}``         POST a sealed status report; 2.04 once it is durable
  ``/p/{sha256}``                  payload bytes, Block2

Only the device itself reads its notice: an observation is taken (and kept) only for a request
that carries the device's credential; anyone else gets 4.01 and costs no memory. Each device has
one observation, the newest: a device that comes back from a new address (a reboot, a NAT
rebinding) replaces its old one. The address it observed from is remembered, so that a notice for
a device that has no observation here (this server restarted, or the device's observation
lapsed) is pushed to it: ``POST /n/{tenant}/{device}`` on the device's own endpoint.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import aiocoap
from aiocoap import resource
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.optiontypes import BlockOption
from aiocoap.pipe import error_to_message, run_driving_pipe
from aiocoap.transports import udp6

from fwcm import protocol
from fwcm.protocol import ProtocolError
from fwcm.transport.inbound import Inbound
from fwcm.transport.notices import NoticeSender, Render

log = logging.getLogger(__name__)

NoticeSource = Callable[[str, str], Awaitable[bytes | None]]
PayloadSource = Callable[[str, int, int], Awaitable[tuple[bytes, int] | None]]
"""(sha256, offset, size) → that many bytes of the payload from offset and its total size, or None."""
RefusalSource = Callable[[str, dict[str, str], str], Awaitable[str | None]]
"""(sha256, query, transport) → why a payload fetch is refused (4.01), or None."""
Authorizer = Callable[[str, str, str], Awaitable[bool]]
"""(tenant, device, credential) → whether a known device presents its own credential."""
Observed = Callable[[str, str, str], None]
"""(tenant, device, address) of a device that observes its notice: where to push later."""

_REFUSAL_CODES = {
    "oversized": Code.REQUEST_ENTITY_TOO_LARGE,
    "mac": Code.UNAUTHORIZED,
    "unknown_device": Code.NOT_FOUND,
    "forbidden": Code.FORBIDDEN,
}
ACK_TIMEOUT_S = 30.0
RETRY_AFTER_S = 5
"""Max-Age of a 5.03 answered while storage is unavailable: when to ask again."""
CREDENTIAL_QUERY = "k"
BLOCK_SZX = 6
"""Largest Block2 size served: 2**(6+4) = 1024 bytes (a client may ask for smaller blocks)."""
MAX_PUSHES_IN_FLIGHT = 256
PUSH_TIMEOUT_S = 30.0


class Unavailable(Exception):
    """The storage behind a resource is unreachable: the request is answered 5.03."""


def _two_segments(request: aiocoap.Message) -> tuple[str, str] | None:
    path = request.opt.uri_path
    if len(path) != 2 or not all(protocol.NAME_RE.match(p) for p in path):
        return None
    return path[0], path[1]


def _query(request: aiocoap.Message) -> dict[str, str]:
    return dict(q.partition("=")[::2] for q in request.opt.uri_query)


def _unavailable() -> aiocoap.Message:
    msg = aiocoap.Message(code=Code.SERVICE_UNAVAILABLE, payload=b"storage unavailable")
    msg.opt.max_age = RETRY_AFTER_S
    return msg


class Site(resource.Site):
    """aiocoap's site, routing a request without copying it deeply.

    aiocoap's own routing builds each request's full URI and deep-copies all its options to strip
    the resource's path: about a third of the CPU a payload block costs. Here the stripped request
    shares the request's option values (aiocoap replaces an option's value, it does not change it
    in place), and its original URI is not kept (no fwcm resource asks for it). The lookup is
    aiocoap's: an exact resource first, else the path-capable resource with the longest prefix.
    """

    def _find_child_and_pathstripped_message(self, request: aiocoap.Message) -> tuple[Any, aiocoap.Message]:
        path = request.opt.uri_path
        if path in self._resources:
            return self._resources[path], _stripped(request, len(path))
        for cut in range(len(path) - 1, 0, -1):
            child = self._subsites.get(path[:cut])
            if child is not None:  # a sub-site sees its root (a trailing "/") as an empty path
                return child, _stripped(request, len(path) if path[cut:] == ("",) else cut)
        raise KeyError(path)


def _stripped(request: aiocoap.Message, segments: int) -> aiocoap.Message:
    """A copy of ``request`` without the first ``segments`` of its Uri-Path (what aiocoap's
    ``Message.copy`` makes, without its deep copy of the options)."""
    new = aiocoap.Message(
        code=request.code, payload=request.payload, transport_tuning=request.transport_tuning
    )
    new.mtype, new.mid, new.token = request.mtype, request.mid, request.token
    new.remote, new.direction = request.remote, request.direction
    for option in request.opt.option_list():
        if option.number == OptionNumber.URI_PATH and segments > 0:
            segments -= 1
        else:
            new.opt.add_option(option)
    return new


class NoticeResource(resource.ObservableResource, resource.PathCapable):
    """One observable notice per device, addressed by the rest of the path."""

    def __init__(self, source: NoticeSource, authorize: Authorizer, observed: Observed) -> None:
        super().__init__()
        self._source = source
        self._authorize = authorize
        self._observed = observed
        self._observers: dict[tuple[str, str], Any] = {}

    async def _allowed(self, request: aiocoap.Message, key: tuple[str, str]) -> bool:
        credential = _query(request).get(CREDENTIAL_QUERY, "")
        return bool(credential) and await self._authorize(key[0], key[1], credential)

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        key = _two_segments(request)
        try:
            allowed = key is not None and await self._allowed(request, key)
        except Unavailable:
            allowed = False  # render_get answers 5.03, which ends the observation
        if key is None or not allowed:
            # aiocoap calls the cancellation callback in any case; the refusal render ends it
            serverobservation.accept(lambda: None)
            return
        old = self._observers.get(key)
        self._observers[key] = serverobservation

        def _cancel() -> None:
            if self._observers.get(key) is serverobservation:
                del self._observers[key]

        serverobservation.accept(_cancel)
        if old is not None:  # the device observes from elsewhere now: end the old observation
            old.trigger(aiocoap.Message(code=Code.CONFLICT, payload=b"observation superseded"), is_last=True)
        self._observed(key[0], key[1], request.remote.hostinfo)

    def notify(self, tenant: str, device: str) -> bool:
        """Re-render the notice for the device's observer; False if it has none here."""
        obs = self._observers.get((tenant, device))
        if obs is not None:
            obs.trigger()
        return obs is not None

    @property
    def observer_count(self) -> int:
        return len(self._observers)

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        key = _two_segments(request)
        if key is None:
            return aiocoap.Message(code=Code.NOT_FOUND)
        try:
            if not await self._allowed(request, key):
                return aiocoap.Message(code=Code.UNAUTHORIZED, payload=b"device credential (k) required")
            payload = await self._source(*key)
        except Unavailable:
            return _unavailable()
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
            return _unavailable()
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
    """Payload bytes by SHA-256, one Block2 block per request.

    Each block is read on its own (from the cached image, or from disk for one too large to cache):
    neither the server nor aiocoap holds a copy of the whole image per request.
    """

    def __init__(self, source: PayloadSource, refusal: RefusalSource | None = None) -> None:
        super().__init__()
        self._source = source
        self._refusal = refusal

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False  # render_get answers the block asked for

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        path = request.opt.uri_path
        if len(path) != 1 or len(path[0]) != 64:
            return aiocoap.Message(code=Code.NOT_FOUND)
        sha = path[0].lower()
        asked = request.opt.block2
        szx = min(asked.size_exponent, BLOCK_SZX) if asked is not None else BLOCK_SZX
        number = asked.block_number if asked is not None else 0
        size = 1 << (szx + 4)
        try:
            if self._refusal is not None:
                refused = await self._refusal(sha, _query(request), "coap")
                if refused is not None:
                    return aiocoap.Message(code=Code.UNAUTHORIZED, payload=refused.encode()[:100])
            found = await self._source(sha, number * size, size)
        except Unavailable:
            return _unavailable()
        if found is None:
            return aiocoap.Message(code=Code.NOT_FOUND)
        block, total = found
        if number * size >= max(total, 1):
            return aiocoap.Message(code=Code.BAD_OPTION, payload=b"block beyond the end of the payload")
        msg = aiocoap.Message(code=Code.CONTENT, payload=block)
        if asked is not None or total > size:
            more = (number + 1) * size < total
            msg.opt.block2 = BlockOption.BlockwiseTuple(number, more, szx)
            msg.opt.size2 = total
        msg.opt.etag = bytes.fromhex(sha[:16])
        return msg


class CoapTransport(NoticeSender):
    """Serves the CoAP resources on one UDP socket, and pushes notices to devices' endpoints."""

    def __init__(
        self,
        bind: tuple[str, int],
        deliver: Callable[[Inbound], None],
        notices: NoticeSource,
        payloads: PayloadSource,
        refusal: RefusalSource | None = None,
        *,
        authorize: Authorizer,
        observed: Observed = lambda _t, _d, _a: None,
    ) -> None:
        self.bind = bind
        self.addresses: dict[tuple[str, str], str] = {}
        """Where each device last observed from (``host:port``): where its notices are pushed."""
        self._observed = observed
        self.notices = NoticeResource(notices, authorize, self._remember)
        site = Site()
        site.add_resource(["n"], self.notices)
        site.add_resource(["s"], StatusResource(deliver))
        site.add_resource(["p"], PayloadResource(payloads, refusal))
        self._site = site
        self._context: aiocoap.Context | None = None
        self._pushes: set[asyncio.Task[None]] = set()
        self.pushed = 0

    async def start(self) -> None:
        tolerate_stale_icmp_errors()
        self._context = await _Context.create_server_context(self._site, bind=self.bind, transports=["udp6"])
        bound_duplicate_memory(self._context, DUPLICATE_MEMORY)
        log.info("CoAP listening on %s:%d", *self.bind)

    async def stop(self) -> None:
        for task in list(self._pushes):
            task.cancel()
        if self._context is not None:
            await self._context.shutdown()
            self._context = None

    def _remember(self, tenant: str, device: str, address: str) -> None:
        if self.addresses.get((tenant, device)) != address:
            self.addresses[(tenant, device)] = address
            self._observed(tenant, device, address)

    def clear_notice(self, tenant: str, device: str) -> None:
        """Push nothing more to where the device observed from (its notice resource answers from
        the database, which withdrew its deployments)."""
        self.addresses.pop((tenant, device), None)

    def send_notice(self, tenant: str, device: str, render: Render) -> bool:
        """Tell a device its notice changed: through its observation (the device reads the notice
        resource again), else by pushing the notice (``render()``) to the endpoint it last
        observed from. False if neither is possible."""
        if self.notices.notify(tenant, device):
            return True
        address = self.addresses.get((tenant, device))
        if address is None or self._context is None or len(self._pushes) >= MAX_PUSHES_IN_FLIGHT:
            return False
        task = asyncio.get_running_loop().create_task(self._push(tenant, device, address, render()))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)
        return True

    async def _push(self, tenant: str, device: str, address: str, payload: bytes) -> None:
        assert self._context is not None
        path = "/".join(protocol.coap_notice_path(tenant, device))
        msg = aiocoap.Message(code=Code.POST, uri=f"coap://{address}/{path}", payload=payload)
        try:
            async with asyncio.timeout(PUSH_TIMEOUT_S):
                response = await self._context.request(msg).response
        except (TimeoutError, aiocoap.error.Error, OSError) as exc:
            log.info("push of the notice of %s/%s to %s failed: %s", tenant, device, address, exc)
            return
        self.pushed += 1
        if not response.code.is_successful():
            log.info("push to %s/%s at %s answered %s", tenant, device, address, response.code)


# -- aiocoap's udp6 and ICMP errors ---------------------------------------------------------------

DUPLICATE_MEMORY = 8192
"""Exchanges whose response the message layer keeps for a retransmitted request (see
:func:`bound_duplicate_memory`)."""


class _RecentExchanges(OrderedDict[Any, Any]):
    """aiocoap's memory of recent (peer, message id) pairs and their responses, holding at most
    ``limit``: the oldest is forgotten first; its own timer's later removal finds nothing."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self and len(self) >= self.limit:
            self.popitem(last=False)
        super().__setitem__(key, value)

    def pop(self, key: Any, default: Any = None) -> Any:
        return super().pop(key, default)


class _Context(aiocoap.Context):
    """aiocoap's server context, naming each request's rendering task plainly.

    aiocoap names the task by the request's description, formatted for every request whether
    anyone reads it or not: for a campaign's payload blocks that formatting was the largest single
    cost of the server's CoAP work (15 % of its samples)."""

    def render_to_pipe(self, pipe: Any) -> None:
        run_driving_pipe(error_to_message(pipe, self.log), self._render_to_pipe(pipe), name="CoAP request")


def bound_duplicate_memory(context: aiocoap.Context, limit: int) -> None:
    """Hold the message layer's duplicate detection to the ``limit`` newest exchanges.

    aiocoap keeps every response to a confirmable request for EXCHANGE_LIFETIME (247 s), to answer
    a retransmission without running the request again: a campaign's payload blocks (a 1 KiB
    response each) then held hundreds of MB. Bounded by count, a retransmission arriving after
    ``limit`` newer exchanges is run again, which fwcm's resources tolerate: payload blocks are
    idempotent reads, reports carry a sequence number that ingest deduplicates, and observe
    registrations replace one another.
    """
    for tokens in context.request_interfaces:
        manager: Any = getattr(tokens, "token_interface", None)
        recent = getattr(manager, "_recent_messages", None)
        if isinstance(recent, dict) and not isinstance(recent, _RecentExchanges):
            bounded = _RecentExchanges(limit)
            bounded.update(recent)
            manager._recent_messages = bounded


_STALE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})


def tolerate_stale_icmp_errors() -> None:
    """Keep one unreachable device from ending another device's observation.

    With ``IP_RECVERR`` Linux reports an ICMP error (say, port unreachable from a device that
    rebooted onto a new port) twice: in the socket's error queue, naming the peer that caused it,
    which aiocoap handles correctly; and as a pending socket error that the *next* ``sendmsg``
    raises, whichever peer that one goes to. aiocoap's udp6 blames the peer it was sending to, so
    an innocent device's notification failed and its observation ended. Here an error raised by a
    send is taken as stale, and the datagram is sent once more (the failed call did not send it);
    only an error the second send raises too is the peer's own.
    """
    cls: Any = udp6.MessageInterfaceUDP6
    if getattr(cls, "_fwcm_stale_errors", False):
        return
    send, error_received = cls.send, cls.error_received

    def patched_send(self: Any, message: aiocoap.Message) -> None:
        self._fwcm_first_try, self._fwcm_stale = True, None
        try:
            send(self, message)
        finally:
            self._fwcm_first_try = False
        if self._fwcm_stale is not None:
            self._fwcm_stale = None
            send(self, message)

    def patched_error_received(self: Any, exc: Exception) -> None:
        if getattr(self, "_fwcm_first_try", False) and getattr(exc, "errno", None) in _STALE_ERRNOS:
            self._fwcm_stale = exc
            return
        error_received(self, exc)

    cls.send, cls.error_received = patched_send, patched_error_received
    cls._fwcm_stale_errors = True
