"""The kit's side of the device link: it plays the fwcm server for one device.

Over MQTT it logs in to the broker the user names (an account that may publish the device's notice
topic and read its status topic, such as the service account of fwcm's brokers), publishes sealed
notices retained with QoS 1 and reads the device's reports. Over CoAP it *is* the server the device
talks to: ``/n/{tenant}/{device}?k=`` (observable, the device's password required), ``/s/...`` for
reports and ``/p/{sha256}`` for payloads, bound to loopback unless told otherwise.

Every report is checked with the device's secret as the server checks it; what fails is kept as a
refusal with its reason, so a scenario can fail on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiocoap
import aiomqtt
from aiocoap import resource
from aiocoap.numbers.codes import Code

from fwcm import protocol
from fwcm.conformance.payloads import PayloadStore, coap_payload_resource
from fwcm.protocol import Report
from fwcm.transport.mqtt import MqttSettings

log = logging.getLogger(__name__)

MAX_REPORTS = 10_000
"""A device that floods the kit is cut off here (and fails): the inbox never grows unbounded."""


@dataclass(frozen=True)
class Device:
    """The device under test as the server knows it."""

    tenant: str
    name: str
    secret: bytes

    @property
    def password(self) -> str:
        return protocol.device_password(self.secret, self.tenant, self.name)


@dataclass(frozen=True)
class Received:
    report: Report
    at: float


@dataclass
class Inbox:
    """Every report of the device under test, in arrival order, and every refused message."""

    device: Device
    reports: list[Received] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self, data: bytes) -> str | None:
        """Check and keep one message; the refusal reason, or None when it was accepted."""
        if len(self.reports) >= MAX_REPORTS:
            reason = "flood"
        else:
            try:
                report = protocol.decode_report(data, self.device.secret)
            except protocol.ProtocolError as exc:
                reason = f"{exc.reason}: {exc}"
            else:
                if report.device != self.device.name:
                    reason = f"report names {report.device!r}"
                else:
                    self.reports.append(Received(report, time.monotonic()))
                    self.changed.set()
                    return None
        self.refused.append(reason)
        self.changed.set()
        return reason

    def campaign(self, campaign: int) -> list[Report]:
        return [r.report for r in self.reports if r.report.campaign == campaign]

    def hellos(self) -> list[Received]:
        return [r for r in self.reports if r.report.campaign == 0]

    async def wait(self, predicate: Any, timeout: float) -> bool:
        """Wait until ``predicate()`` holds (True) or ``timeout`` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.25))
        return True


class DeviceSide(Protocol):
    inbox: Inbox

    async def notify(self, sealed: bytes) -> None:
        """Make ``sealed`` the device's current notice."""

    async def clear(self) -> None:
        """Leave the device without a notice."""


class MqttSide:
    """Notices retained on ``fwcm/v1/{tenant}/{device}/notice``; reports from its status topic."""

    def __init__(self, url: str, inbox: Inbox) -> None:
        self.settings = MqttSettings.from_url(url)
        self.inbox = inbox
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MqttSide:
        s = self.settings
        dev = self.inbox.device
        client = aiomqtt.Client(
            s.host,
            s.port,
            identifier=f"fwcm-conformance-{uuid.uuid4().hex[:8]}",
            username=s.username,
            password=s.password,
            protocol=aiomqtt.ProtocolVersion.V5 if s.version == 5 else aiomqtt.ProtocolVersion.V311,
            tls_params=aiomqtt.TLSParameters(ca_certs=s.ca_file) if s.tls else None,
            timeout=15,
        )
        await client.__aenter__()
        self._client = client
        await client.subscribe(protocol.status_topic(dev.tenant, dev.name), qos=1)
        self._reader = asyncio.create_task(self._read(client), name="conformance-mqtt")
        return self

    async def _read(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for msg in client.messages:
                if isinstance(msg.payload, bytes):
                    reason = self.inbox.take(msg.payload)
                    if reason is not None:
                        log.warning("report refused: %s", reason)

    async def notify(self, sealed: bytes) -> None:
        assert self._client is not None
        dev = self.inbox.device
        await self._client.publish(protocol.notice_topic(dev.tenant, dev.name), sealed, qos=1, retain=True)

    async def clear(self) -> None:
        await self.notify(b"")

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await asyncio.wait_for(self._client.__aexit__(None, None, None), 5)


class _Notice(resource.ObservableResource, resource.PathCapable):
    """``/n/{tenant}/{device}?k=PASSWORD``: the current sealed notice, observable."""

    def __init__(self, device: Device) -> None:
        super().__init__()
        self.device = device
        self.current = b""
        self.observers: set[Any] = set()
        self.registrations = 0

    def _allowed(self, request: aiocoap.Message) -> bool:
        path = tuple(request.opt.uri_path)
        return path == (self.device.tenant, self.device.name) and (
            f"k={self.device.password}" in request.opt.uri_query
        )

    async def add_observation(self, request: aiocoap.Message, serverobservation: Any) -> None:
        if not self._allowed(request):
            return
        self.observers.add(serverobservation)
        self.registrations += 1
        serverobservation.accept(lambda: self.observers.discard(serverobservation))

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        if not self._allowed(request):
            return aiocoap.Message(code=Code.UNAUTHORIZED)
        return aiocoap.Message(code=Code.CONTENT, payload=self.current)

    def show(self, sealed: bytes) -> None:
        self.current = sealed
        for obs in list(self.observers):
            obs.trigger()


class _Status(resource.Resource, resource.PathCapable):
    """``/s/{tenant}/{device}``: a sealed report, 2.04 once kept."""

    def __init__(self, inbox: Inbox) -> None:
        super().__init__()
        self.inbox = inbox

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        dev = self.inbox.device
        if tuple(request.opt.uri_path) != (dev.tenant, dev.name):
            return aiocoap.Message(code=Code.NOT_FOUND)
        if len(request.payload) > protocol.MAX_REPORT_BYTES or request.opt.block1 is not None:
            return aiocoap.Message(code=Code.REQUEST_ENTITY_TOO_LARGE)
        reason = self.inbox.take(request.payload)
        if reason is None:
            return aiocoap.Message(code=Code.CHANGED)
        log.warning("report refused: %s", reason)
        return aiocoap.Message(code=Code.UNAUTHORIZED if reason.startswith("mac") else Code.BAD_REQUEST)


class CoapSide:
    """The CoAP server a device under test observes and reports to (and fetches payloads from)."""

    def __init__(self, host: str, port: int, inbox: Inbox, store: PayloadStore) -> None:
        self.host = host
        self.port = port
        self.advertised = host
        self.inbox = inbox
        self.notices = _Notice(inbox.device)
        self.store = store
        self._ctx: aiocoap.Context | None = None

    def url(self, sha: str) -> str:
        return f"coap://{self.advertised}:{self.port}{protocol.payload_path(sha)}"

    async def __aenter__(self) -> CoapSide:
        site = resource.Site()
        site.add_resource(["n"], self.notices)
        site.add_resource(["s"], _Status(self.inbox))
        site.add_resource(["p"], coap_payload_resource(self.store))
        self._ctx = await aiocoap.Context.create_server_context(
            site, bind=(self.host, self.port), transports=["udp6"]
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ctx is not None:
            await self._ctx.shutdown()

    async def notify(self, sealed: bytes) -> None:
        self.notices.show(sealed)

    async def clear(self) -> None:
        self.notices.show(b"")
