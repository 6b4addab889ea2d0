"""The kit around one device under test: its servers, the manifests and notices it makes, and the
waits scenarios need. Everything is bounded: every wait has a timeout, every server binds to
loopback unless told otherwise, and the kit leaves the device without a notice when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

from fwcm import manifest, protocol
from fwcm.conformance.payloads import HttpPayloadServer, PayloadStore
from fwcm.conformance.wire import CoapSide, Device, DeviceSide, Inbox, MqttSide
from fwcm.protocol import LwState, Notice, NoticeKind, Report, Result

Transport = Literal["mqtt", "coap"]


@dataclass(frozen=True)
class KitSettings:
    """What the kit needs to know to play the server for one device."""

    device: Device
    transport: Transport
    vendor_id: uuid.UUID
    class_id: uuid.UUID
    signing_key: manifest.PrivateKey
    """A key the device trusts for manifests (its public half is one of the device's anchors)."""
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    coap_bind: tuple[str, int] = ("127.0.0.1", 5683)
    http_bind: tuple[str, int] = ("127.0.0.1", 0)
    public_host: str | None = None
    """The host name devices reach the kit's payload and CoAP servers at (default: the bind host)."""
    image_size: int = 48 * 1024
    timeout: float = 30.0
    """Longest wait for one scenario's outcome."""
    quiet: float = 2.0
    """How long the device must stay silent where a scenario expects it to ignore a notice."""
    hello_timeout: float = 60.0
    campaign_base: int = field(default_factory=lambda: int(time.time()) * 100)
    """First campaign id: fresh per run, so a device that remembers finished campaigns takes the
    kit's notices as new."""


def image_bytes(seed: int, size: int) -> bytes:
    """Deterministic, distinct image bytes per scenario."""
    out = bytearray()
    block = hashlib.sha256(f"fwcm conformance image {seed}".encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


class Kit:
    """The server side for one device: notices, payloads, reports."""

    def __init__(self, settings: KitSettings, side: DeviceSide, http: HttpPayloadServer, store: PayloadStore):
        self.settings = settings
        self.side = side
        self.http = http
        self.store = store
        self.inbox = side.inbox
        self.installed = 0
        """The sequence the device last said it runs (report key 9)."""
        self.last_update: tuple[int, bytes, int] | None = None
        """(campaign, image SHA-256, sequence) of the last update the kit saw succeed."""
        self.last_notice: bytes | None = None
        self._next = settings.campaign_base

    @property
    def device(self) -> Device:
        return self.settings.device

    def campaign(self) -> int:
        """A fresh campaign id."""
        self._next += 1
        return self._next

    def uris(self, sha: str) -> list[str]:
        """Payload URIs in the order the device's transport prefers."""
        http = self.http.url(sha)
        if isinstance(self.side, CoapSide):
            return [self.side.url(sha), http]
        return [http]

    def publish(self, campaign: int, **kw: object) -> tuple[bytes, str]:
        """A fresh image for ``campaign``, served (as ``kw`` says); the image and its hex SHA-256."""
        image = image_bytes(campaign, self.settings.image_size)
        return image, self.store.publish(image, **kw)  # type: ignore[arg-type]

    def envelope(self, image: bytes, sha: str, *, sequence: int, class_id: uuid.UUID | None = None) -> bytes:
        info = manifest.ManifestInfo(
            sequence=sequence,
            vendor_id=self.settings.vendor_id,
            class_id=class_id or self.settings.class_id,
            image_digest=hashlib.sha256(image).digest(),
            image_size=len(image),
            uris=tuple(self.uris(sha)),
        )
        return manifest.build_envelope(info, self.settings.signing_key)

    def seal(
        self, kind: NoticeKind, campaign: int, envelope: bytes | None = None, *, key: bytes | None = None
    ) -> bytes:
        n = Notice(kind, self.device.name, campaign, 1, int(time.time()), envelope=envelope)
        return protocol.encode_notice(key or self.device.secret, n)

    async def notify(self, sealed: bytes) -> None:
        self.last_notice = sealed
        await self.side.notify(sealed)

    # -- waiting for the device ----------------------------------------------------------------

    def final(self, campaign: int) -> Report | None:
        """The device's terminal report (Idle with a result) for ``campaign``, if it sent one."""
        for r in self.inbox.campaign(campaign):
            if r.state == LwState.IDLE and r.result != Result.INITIAL:
                return r
        return None

    async def wait_final(self, campaign: int, timeout: float | None = None) -> Report | None:
        await self.inbox.wait(lambda: self.final(campaign) is not None, timeout or self.settings.timeout)
        found = self.final(campaign)
        if found is not None and found.installed_sequence is not None:
            self.installed = found.installed_sequence
        return found

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (timeout or self.settings.timeout)
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def settle(self) -> None:
        """A breath between scenarios, so one scenario's last report is not taken for the next's."""
        await asyncio.sleep(min(0.2, self.settings.quiet))


@contextlib.asynccontextmanager
async def open_kit(settings: KitSettings) -> AsyncIterator[Kit]:
    """Start the kit's servers (and its broker client); on exit, clear the notice and stop them."""
    store = PayloadStore()
    inbox = Inbox(settings.device)
    host, port = settings.http_bind
    async with HttpPayloadServer(store, host, port) as http:
        http.advertised = settings.public_host or host
        side: MqttSide | CoapSide
        if settings.transport == "coap":
            side = CoapSide(*settings.coap_bind, inbox, store)
            side.advertised = settings.public_host or settings.coap_bind[0]
        else:
            side = MqttSide(settings.mqtt_url, inbox)
        async with side:
            kit = Kit(settings, side, http, store)
            try:
                yield kit
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(side.clear(), 5)
