"""LwM2M adapter of the server: a LwM2M 1.1 Server for firmware updates through object /5.

Devices register on their own UDP port (``FWCM_LWM2M_BIND``), NoSec: ``POST /rd?ep=…`` with the
endpoint name ``{tenant}:{device}`` of a device of transport ``lwm2m``; ``POST /rd/{id}`` updates
a registration and ``DELETE /rd/{id}`` ends it (see docs/lwm2m.md). The server then speaks to the
device as a CoAP client, from the same socket, at the address it registered from.

An update notice becomes the LwM2M pull flow: write the Package URI (/5/0/1) with where the image
is served, observe State (/5/0/3) and Update Result (/5/0/5), execute Update (/5/0/2) once the
state is Downloaded. Each change of state or result becomes an ordinary :class:`Report` of the
deployment's campaign attempt, handed to ingest (``Inbound`` kind ``report``): the rules that
judge MQTT and CoAP devices judge these too. A cancel notice writes an empty Package URI.

Every request to a device is bounded in time, one update drive per device runs at a time, and
whatever a device sends that does not decode is counted and ignored (the deployment's timeout
judges a device that never says anything useful).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import aiocoap
import cbor2
from aiocoap import resource
from aiocoap.numbers.codes import Code

from fwcm import manifest, protocol
from fwcm.protocol import LwState, Notice, NoticeKind, ProtocolError, Report, Result
from fwcm.protocol import lwm2m as lw
from fwcm.protocol.fields import loads
from fwcm.server import metrics
from fwcm.transport.coap import RETRY_AFTER_S, Unavailable, tolerate_stale_icmp_errors
from fwcm.transport.inbound import Inbound
from fwcm.transport.notices import NoticeSender, Render

log = logging.getLogger(__name__)

NoticeSource = Callable[[str, str], Awaitable[bytes | None]]
"""(tenant, device) → the device's current sealed notice, or None."""
Admits = Callable[[str, str], Awaitable[bool]]
"""(tenant, device) → whether it is a known, active device of transport ``lwm2m``."""
PackageUri = Callable[[bytes], str]
"""An image's SHA-256 → the URI the device downloads it from."""

TRANSPORT = "lwm2m"
REQUEST_TIMEOUT_S = 30.0
"""Each request to a device (write, read, execute, the first answer of an observation)."""
DRIVE_TIMEOUT_S = 3600.0
"""An update drive ends after this long; the deployment's own timeout judges the device."""
POLL_S = 10.0
"""A drive that heard nothing for this long reads State and Update Result itself."""
EXPIRY_GRACE_S = 5.0
SWEEP_S = 5.0
MAX_CLIENTS = 100_000
MAX_CHANGES = 32
"""Notifications queued per drive; a device that floods is slowed down, not remembered."""
MAX_TASKS = 4096
"""Registrations being resumed and cancels being written at once; beyond, a registration is
only recorded (the engine's next notice reaches the device) and a cancel is left to the timeout."""
LWM2M_RESULTS = range(0, 12)
"""The Update Result values LwM2M defines; fwcm's own (12 and up) are never a device's."""


@dataclass
class Client:
    """One registration: who, where from, until when, and the update drive running for it."""

    tenant: str
    device: str
    reg_id: str
    remote: Any
    expires: float
    objects: frozenset[lw.Path]
    drive: asyncio.Task[None] | None = None
    driving: tuple[int, int] | None = None
    """(campaign, attempt) of the drive running."""
    phase: LwState | None = None
    """The state the drive last reported."""

    @property
    def key(self) -> tuple[str, str]:
        return self.tenant, self.device


@dataclass
class Counts:
    registered: int = 0
    deregistered: int = 0
    expired: int = 0
    refused: int = 0
    reports: int = 0
    executed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def peek_notice(data: bytes) -> Notice:
    """The notice the server itself just sealed (its MAC is for the device, not checked here)."""
    frame = protocol.unseal(data, protocol.MAX_NOTICE_BYTES)
    body = loads(frame.payload)
    if not isinstance(body, dict):
        raise ProtocolError("shape", "notice body is not a map")
    return Notice.from_map(body)


@lru_cache(maxsize=64)
def _image_digest(envelope: bytes) -> bytes:
    return manifest.decode_envelope(envelope).info.image_digest


class RegisterResource(resource.Resource):
    """``/rd``: register (POST)."""

    def __init__(self, transport: Lwm2mTransport) -> None:
        super().__init__()
        self._t = transport

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False  # a registration fits a datagram; larger ones are refused

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return await _registration(self._t, request)


class RegistrationResource(resource.Resource, resource.PathCapable):
    """``/rd/{id}``: update (POST) and de-register (DELETE)."""

    def __init__(self, transport: Lwm2mTransport) -> None:
        super().__init__()
        self._t = transport

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return await _registration(self._t, request)

    async def render_delete(self, request: aiocoap.Message) -> aiocoap.Message:
        path = request.opt.uri_path
        if len(path) != 1 or not self._t.deregister(path[0]):
            return aiocoap.Message(code=Code.NOT_FOUND)
        return aiocoap.Message(code=Code.DELETED)


async def _registration(t: Lwm2mTransport, request: aiocoap.Message) -> aiocoap.Message:
    """A registration (no path left) or a registration update (the id left); refusals counted."""
    path = request.opt.uri_path
    try:
        if not path:
            return await t.register(request)
        if len(path) == 1:
            return t.update(path[0], request)
    except ProtocolError as err:
        t.refuse(err.reason, str(err))
        return aiocoap.Message(code=Code.BAD_REQUEST, payload=str(err).encode()[:100])
    except Unavailable:
        msg = aiocoap.Message(code=Code.SERVICE_UNAVAILABLE, payload=b"storage unavailable")
        msg.opt.max_age = RETRY_AFTER_S
        return msg
    return aiocoap.Message(code=Code.NOT_FOUND)


class Lwm2mTransport(NoticeSender):
    """The LwM2M registration interface and the firmware-update drive of each device."""

    def __init__(
        self,
        bind: tuple[str, int],
        deliver: Callable[[Inbound], None],
        notices: NoticeSource,
        admits: Admits,
        package_uri: PackageUri,
        *,
        request_timeout: float = REQUEST_TIMEOUT_S,
        drive_timeout: float = DRIVE_TIMEOUT_S,
        poll_s: float = POLL_S,
    ) -> None:
        self.bind = bind
        self._deliver = deliver
        self._notices = notices
        self._admits = admits
        self.package_uri = package_uri
        """Where a device downloads an image: ``FWCM_LWM2M_PACKAGE_URL``/p/{sha256}."""
        self.request_timeout = request_timeout
        self.drive_timeout = drive_timeout
        self.poll_s = poll_s
        self.clients: dict[tuple[str, str], Client] = {}
        self._by_id: dict[str, Client] = {}
        self._by_address: dict[str, Client] = {}
        """One client per address: a device that registers from where another one was (a port
        reused after a reboot, a NAT binding handed on) makes that registration stale, so no
        request meant for one device is answered by another."""
        self._started: dict[tuple[str, str], tuple[int, int]] = {}
        """The attempt whose Package URI this server wrote, per device: a device that registers
        again mid-update (it rebooted to install) is followed, not sent the URI once more."""
        self._ended: dict[tuple[str, str], tuple[int, int]] = {}
        """The attempt whose outcome was reported, per device: a notice of it sent again before
        ingest applied the outcome changes nothing."""
        self._seq = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._context: aiocoap.Context | None = None
        self.counts = Counts()
        site = resource.Site()
        site.add_resource(["rd"], RegisterResource(self))
        site.add_resource(["rd"], RegistrationResource(self))
        self._site = site

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        tolerate_stale_icmp_errors()
        self._context = await aiocoap.Context.create_server_context(
            self._site, bind=self.bind, transports=["udp6"]
        )
        self._spawn(self._sweep())
        log.info("LwM2M server listening on %s:%d (NoSec)", *self.bind)

    async def stop(self) -> None:
        for client in list(self.clients.values()):
            self._end_drive(client)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._context is not None:
            await self._context.shutdown()
            self._context = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def refuse(self, reason: str, why: str) -> None:
        """Count something a device sent that cannot be accepted."""
        self.counts.refused += 1
        self.counts.reasons[reason] = self.counts.reasons.get(reason, 0) + 1
        metrics.REJECTED.labels(TRANSPORT, reason).inc()
        log.info("LwM2M: refused: %s", why)

    # -- registration interface -----------------------------------------------------------------

    async def register(self, request: aiocoap.Message) -> aiocoap.Message:
        reg = lw.parse_query(request.opt.uri_query)
        objects = lw.parse_links(request.payload)
        tenant, device = lw.split_endpoint(reg.endpoint or "")
        if not await self._admits(tenant, device):
            self.refuse("unknown_device", f"registration of {reg.endpoint!r}: no such LwM2M device")
            return aiocoap.Message(code=Code.FORBIDDEN, payload=b"unknown endpoint")
        old = self.clients.get((tenant, device))
        if old is None and len(self.clients) >= MAX_CLIENTS:
            self.refuse("capacity", f"registration of {reg.endpoint!r}: {MAX_CLIENTS} clients registered")
            return aiocoap.Message(code=Code.SERVICE_UNAVAILABLE)
        if old is not None:
            self._forget(old)
        lifetime = reg.lifetime or lw.DEFAULT_LIFETIME_S
        client = Client(
            tenant, device, secrets.token_hex(6), request.remote, time.monotonic() + lifetime, objects
        )
        self.clients[client.key] = client
        self._by_id[client.reg_id] = client
        self._place(client)
        self.counts.registered += 1
        self._presence(client, True)
        if not lw.has_instance(objects, 5):
            log.warning("LwM2M %s:%s registered without /5/0: it cannot be updated", tenant, device)
        elif len(self._tasks) < MAX_TASKS:
            self._spawn(self._resume(client))
        response = aiocoap.Message(code=Code.CREATED)
        response.opt.location_path = ("rd", client.reg_id)
        return response

    def update(self, reg_id: str, request: aiocoap.Message) -> aiocoap.Message:
        client = self._by_id.get(reg_id)
        if client is None:
            return aiocoap.Message(code=Code.NOT_FOUND)
        reg = lw.parse_query(request.opt.uri_query, update=True)
        if request.payload:
            client.objects = lw.parse_links(request.payload)
        if request.remote.hostinfo != client.remote.hostinfo:  # a NAT moved it
            self._by_address.pop(client.remote.hostinfo, None)
            client.remote = request.remote
            self._place(client)
        client.expires = time.monotonic() + (reg.lifetime or lw.DEFAULT_LIFETIME_S)
        return aiocoap.Message(code=Code.CHANGED)

    def deregister(self, reg_id: str) -> bool:
        client = self._by_id.get(reg_id)
        if client is None:
            return False
        self._forget(client)
        self.counts.deregistered += 1
        self._presence(client, False)
        return True

    def _forget(self, client: Client) -> None:
        self._end_drive(client)
        self._by_id.pop(client.reg_id, None)
        if self.clients.get(client.key) is client:
            del self.clients[client.key]
        if self._by_address.get(client.remote.hostinfo) is client:
            del self._by_address[client.remote.hostinfo]

    def _place(self, client: Client) -> None:
        """Record where ``client`` is; whoever registered from there before is gone."""
        stale = self._by_address.get(client.remote.hostinfo)
        if stale is not None and stale is not client:
            log.info(
                "LwM2M %s:%s registered from where %s:%s was: that registration ends",
                client.tenant,
                client.device,
                stale.tenant,
                stale.device,
            )
            self._forget(stale)
            self._presence(stale, False)
        self._by_address[client.remote.hostinfo] = client

    async def _sweep(self) -> None:
        """Registrations whose lifetime passed without an update end."""
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic() - EXPIRY_GRACE_S
            for client in [c for c in self.clients.values() if c.expires < now]:
                log.info("LwM2M %s:%s: registration expired", client.tenant, client.device)
                self._forget(client)
                self.counts.expired += 1
                self._presence(client, False)

    def _presence(self, client: Client, online: bool) -> None:
        self._deliver(
            Inbound(TRANSPORT, "presence", client.tenant, client.device, b"1" if online else b"0", _ignore)
        )

    # -- notices --------------------------------------------------------------------------------

    def send_notice(self, tenant: str, device: str, render: Render) -> bool:
        client = self.clients.get((tenant, device))
        if client is None or not lw.has_instance(client.objects, 5):
            return False
        self._act(client, render())
        return True

    def clear_notice(self, tenant: str, device: str) -> None:
        client = self.clients.get((tenant, device))
        if client is not None:
            self._end_drive(client)
        self._started.pop((tenant, device), None)
        self._ended.pop((tenant, device), None)

    async def _resume(self, client: Client) -> None:
        """A device (re-)registered: act on the notice it has now, if any."""
        try:
            data = await self._notices(client.tenant, client.device)
        except Exception as exc:  # storage unavailable: the engine's next notice reaches it
            log.warning("LwM2M %s:%s: cannot read its notice: %s", client.tenant, client.device, exc)
            return
        if data is not None and self.clients.get(client.key) is client:
            self._act(client, data)

    def _act(self, client: Client, sealed: bytes) -> None:
        """Start, follow or cancel the device's update as its notice says."""
        try:
            notice = peek_notice(sealed)
            if notice.kind == NoticeKind.UPDATE and notice.envelope is not None:
                _image_digest(notice.envelope)
        except (ProtocolError, manifest.ManifestError) as exc:  # never the engine's problem
            log.warning("LwM2M %s:%s: notice not usable: %s", client.tenant, client.device, exc)
            return
        if notice.kind == NoticeKind.UPDATE and notice.envelope is not None:
            attempt = (notice.campaign, notice.attempt)
            if client.driving == attempt and client.drive is not None and not client.drive.done():
                return  # the same notice again (a retry of the send): the drive goes on
            if self._ended.get(client.key) == attempt:
                return  # its outcome is reported already
            self._end_drive(client)
            follow = self._started.get(client.key) == attempt  # written already: only follow it
            uri = self.package_uri(_image_digest(notice.envelope))
            client.driving = attempt
            client.drive = self._spawn(self._drive(client, attempt, uri, follow=follow))
        elif notice.kind in (NoticeKind.CANCEL, NoticeKind.ABORT):
            attempt = (notice.campaign, notice.attempt)
            if client.driving == attempt and client.phase == LwState.UPDATING:
                return  # too late: the device installs, and its outcome is reported
            if self._ended.get(client.key) == attempt or len(self._tasks) >= MAX_TASKS:
                return
            self._end_drive(client)
            written = self._started.pop(client.key, None) == attempt
            self._spawn(self._cancel(client, attempt, written=written))
        # invitations, commits and credentials have no LwM2M counterpart: nothing to do

    def _end_drive(self, client: Client) -> None:
        if client.drive is not None:
            client.drive.cancel()
        client.drive, client.driving, client.phase = None, None, None

    async def _cancel(self, client: Client, attempt: tuple[int, int], *, written: bool) -> None:
        """Cancel an attempt: empty the Package URI the device was given (which stops its
        download and resets /5 to Idle), then report it cancelled, as the device's answer."""
        if written:
            try:
                code = await self._write(client, lw.FW_PACKAGE_URI, "")
            except (TimeoutError, aiocoap.error.Error, OSError) as exc:
                log.info("LwM2M %s:%s: cancel not written: %s", client.tenant, client.device, exc)
                return  # the deployment's timeout judges it
            if not code.is_successful():
                log.info("LwM2M %s:%s: cancel answered %s", client.tenant, client.device, code)
                return
        self._report(client, attempt, LwState.IDLE, Result.CANCELLED, "Package URI emptied")
        self._ended_attempt(client, attempt)

    # -- the update drive -------------------------------------------------------------------------

    async def _drive(self, client: Client, attempt: tuple[int, int], uri: str, *, follow: bool) -> None:
        """Write the Package URI (unless following an update already started), then report each
        change of State and Update Result until the update ends; execute Update once Downloaded."""
        changes: asyncio.Queue[tuple[lw.Path, int]] = asyncio.Queue(MAX_CHANGES)
        watchers: list[asyncio.Task[None]] = []
        try:
            async with asyncio.timeout(self.drive_timeout):
                if not follow:
                    code = await self._write(client, lw.FW_PACKAGE_URI, uri)
                    if not code.is_successful():
                        self._report(
                            client, attempt, LwState.IDLE, Result.INVALID_URI, f"write refused: {code}"
                        )
                        self._ended_attempt(client, attempt)
                        return
                    self._started[client.key] = attempt
                    if len(self._started) > MAX_CLIENTS:
                        self._started.pop(next(iter(self._started)))
                watchers = [
                    asyncio.create_task(self._observe(client, path, changes))
                    for path in (lw.FW_STATE, lw.FW_RESULT)
                ]
                await self._follow(client, attempt, changes)
        except TimeoutError:
            log.info("LwM2M %s:%s: update drive timed out", client.tenant, client.device)
        except (aiocoap.error.Error, OSError) as exc:
            log.info("LwM2M %s:%s: update drive ended: %s", client.tenant, client.device, exc)
        finally:
            for w in watchers:
                w.cancel()
            for w in watchers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await w

    async def _follow(
        self, client: Client, attempt: tuple[int, int], changes: asyncio.Queue[tuple[lw.Path, int]]
    ) -> None:
        """Report each change of State and Update Result (as ``lw.outcome`` maps them) until the
        update ends; execute Update once the package is downloaded."""
        values: dict[lw.Path, int] = {}
        said: tuple[LwState, Result] | None = None
        executed = False
        while True:
            try:
                async with asyncio.timeout(self.poll_s):
                    path, value = await changes.get()
            except TimeoutError:  # a notification lost, or an observation ended: read both
                await self._poll(client, changes)
                continue
            values[path] = value
            now = lw.outcome(LwState(values.get(lw.FW_STATE, 0)), Result(values.get(lw.FW_RESULT, 0)))
            if now is None or now == said:
                continue  # nothing happened yet, or nothing new
            said = now
            state, result = now
            client.phase = state
            final = state == LwState.IDLE
            detail = f"LwM2M update result {int(result)} ({result.name.lower()})" if final else None
            self._report(client, attempt, state, result, detail)
            if final:
                self._ended_attempt(client, attempt)
                return
            if state == LwState.DOWNLOADED and not executed:
                executed = True
                code = await self._execute(client, lw.FW_UPDATE)
                if code is not None and not code.is_successful():
                    self._report(
                        client, attempt, LwState.IDLE, Result.UPDATE_FAILED, f"execute refused: {code}"
                    )
                    self._ended_attempt(client, attempt)
                    return

    def _ended_attempt(self, client: Client, attempt: tuple[int, int]) -> None:
        self._started.pop(client.key, None)
        self._ended.pop(client.key, None)
        self._ended[client.key] = attempt
        if len(self._ended) > MAX_CLIENTS:
            self._ended.pop(next(iter(self._ended)))

    def _report(
        self,
        client: Client,
        attempt: tuple[int, int],
        state: LwState,
        result: Result,
        detail: str | None = None,
    ) -> None:
        """Hand ingest the report of this change, under a seq that grows across restarts too."""
        self._seq = max(self._seq + 1, time.time_ns() // 1_000_000)
        report = Report(client.device, attempt[0], attempt[1], self._seq, state, result, detail=detail)
        self.counts.reports += 1
        payload = cbor2.dumps(report.to_map(), canonical=True)
        self._deliver(Inbound(TRANSPORT, "report", client.tenant, client.device, payload, _ignore))

    # -- requests to the device -------------------------------------------------------------------

    def _request(self, client: Client, code: Code, path: lw.Path, payload: bytes = b"", **opts: Any) -> Any:
        if self._context is None:
            raise aiocoap.error.LibraryShutdown()
        msg = aiocoap.Message(code=code, payload=payload, uri_path=[str(p) for p in path], **opts)
        msg.remote = client.remote
        return self._context.request(msg)

    async def _write(self, client: Client, path: lw.Path, text: str) -> Code:
        request = self._request(client, Code.PUT, path, text.encode(), content_format=lw.TEXT)
        async with asyncio.timeout(self.request_timeout):
            response = await request.response
        return Code(response.code)

    async def _execute(self, client: Client, path: lw.Path) -> Code | None:
        """Execute a resource; None when no answer came (a device may reboot into the update
        before it answers: what it does next is seen when it registers again)."""
        self.counts.executed += 1
        try:
            async with asyncio.timeout(self.request_timeout):
                response = await self._request(client, Code.POST, path).response
        except (TimeoutError, aiocoap.error.Error, OSError) as exc:
            log.info("LwM2M %s:%s: execute %s: %s", client.tenant, client.device, path, exc)
            return None
        return Code(response.code)

    async def _poll(self, client: Client, changes: asyncio.Queue[tuple[lw.Path, int]]) -> None:
        """Read State and Update Result once."""
        for path in (lw.FW_RESULT, lw.FW_STATE):
            try:
                async with asyncio.timeout(self.request_timeout):
                    response = await self._request(client, Code.GET, path).response
            except (TimeoutError, aiocoap.error.Error, OSError) as exc:
                log.info("LwM2M %s:%s: read of %s: %s", client.tenant, client.device, path, exc)
                return
            await self._take(client, path, response, changes)

    async def _observe(
        self, client: Client, path: lw.Path, changes: asyncio.Queue[tuple[lw.Path, int]]
    ) -> None:
        """Observe one integer resource, queueing each valid value; what does not decode is
        counted and skipped."""
        request = self._request(client, Code.GET, path, observe=0)
        try:
            async with asyncio.timeout(self.request_timeout):
                first = await request.response
            await self._take(client, path, first, changes)
            if not first.code.is_successful():
                return
            async for notification in request.observation:
                await self._take(client, path, notification, changes)
        finally:
            if not request.observation.cancelled:
                request.observation.cancel()

    async def _take(
        self,
        client: Client,
        path: lw.Path,
        msg: aiocoap.Message,
        changes: asyncio.Queue[tuple[lw.Path, int]],
    ) -> None:
        if not msg.code.is_successful():
            log.info("LwM2M %s:%s: read of %s answered %s", client.tenant, client.device, path, msg.code)
            return
        try:
            value = lw.read_int(msg.payload, msg.opt.content_format, path)
            allowed = range(0, 4) if path == lw.FW_STATE else LWM2M_RESULTS
            if value not in allowed:
                raise lw.refuse(f"/{'/'.join(map(str, path))} value {value} is outside LwM2M's range")
        except ProtocolError as err:
            self.refuse(err.reason, f"{client.tenant}:{client.device}: {err}")
            return
        with contextlib.suppress(asyncio.QueueFull):  # a flood: dropped, the next poll catches up
            changes.put_nowait((path, value))


def _ignore(_err: ProtocolError | None) -> None:
    """Reports of LwM2M devices need no acknowledgement: ingest retries until they are durable."""
