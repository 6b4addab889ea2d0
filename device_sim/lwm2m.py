"""A simulated LwM2M 1.1 client: the Device (/3) and Firmware Update (/5) objects over CoAP.

It speaks what a constrained LwM2M device speaks and nothing of fwcm's own protocol: it registers
as ``{tenant}:{device}`` with the LwM2M server, serves reads, observations, writes and executes on
its own UDP socket, and updates itself through the pull flow of object /5. A written Package URI
is downloaded (CoAP Block2 or HTTP) into the inactive flash slot; the only check a plain LwM2M
device can make is the image's SHA-256 when the URI names it (fwcm's ``/p/{sha256}``), and its
size against the slot. Update (/5/0/2) installs it: the device "reboots" into the new slot and
registers again, reporting Update Result 1.

Its encoders are its own (plain text, TLV, SenML JSON, SenML CBOR, one per device by index), so
the server's decoders are tested against an independent implementation.

Fault profiles that apply: ``corrupt`` (Update Result 5), ``install-fail`` (8), ``out-of-memory``
(3), ``flaky`` (the download drops once and resumes), ``slow`` and ``offline``. An LwM2M device
has no manifest, so neither signature, rollback nor attestation faults apply; a failed trial boot
(``boot-fail``) is reported as 8, LwM2M has no "reverted".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import struct
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiocoap
import cbor2
from aiocoap import resource
from aiocoap.numbers.codes import Code

from fwcm.protocol import LwState, Result

from .device import AgentStatus, DeviceConfig
from .faults import DeviceFaults
from .flash import Flash
from .transports import FetchError, SharedClients, fetch_coap, fetch_http, response_within

log = logging.getLogger(__name__)

FORMATS = ("text", "tlv", "senml-json", "senml-cbor")
"""How a device encodes the values it is read or observed with (by its index)."""
CT_TEXT, CT_LINK, CT_TLV, CT_SENML_JSON, CT_SENML_CBOR = 0, 40, 11542, 110, 112
SHA256_IN_URI = re.compile(r"/p/([0-9a-fA-F]{64})(?:\?|$)")
DROP_AFTER_BYTES = 16 * 1024
"""``flaky``: the download drops once after ``drop_at`` times this many bytes."""
REQUEST_TIMEOUT_S = 15.0
DOWNLOAD_TRIES = 6


# -- encoders (the device's own) ------------------------------------------------------------------


def _tlv(ident: int, value: bytes) -> bytes:
    """One TLV "resource with value" entry (LwM2M 1.1 Core §7.4.3)."""
    head = 0xC0
    id_bytes = ident.to_bytes(1 if ident < 256 else 2, "big")
    if ident >= 256:
        head |= 0x20
    if len(value) < 8:
        return bytes([head | len(value)]) + id_bytes + value
    size = len(value).to_bytes(1 if len(value) < 256 else 2, "big")
    return bytes([head | (0x08 if len(size) == 1 else 0x10)]) + id_bytes + size + value


def _tlv_int(value: int) -> bytes:
    for fmt in (">b", ">h", ">i", ">q"):
        with contextlib.suppress(struct.error):
            return struct.pack(fmt, value)
    raise ValueError(value)


def encode(fmt: str, path: tuple[int, int, int], value: int | str) -> tuple[bytes, int]:
    """A single resource's value in ``fmt``: (payload, Content-Format)."""
    name = "/" + "/".join(map(str, path))
    if fmt == "tlv":
        raw = _tlv_int(value) if isinstance(value, int) else value.encode()
        return _tlv(path[2], raw), CT_TLV
    if fmt in ("senml-json", "senml-cbor"):
        base, leaf = name.rsplit("/", 1)
        if fmt == "senml-json":
            record: dict[Any, Any] = {"bn": base + "/", "n": leaf}
            record["v" if isinstance(value, int) else "vs"] = value
            return json.dumps([record]).encode(), CT_SENML_JSON
        cbor_record: dict[Any, Any] = {-2: base + "/", 0: leaf, (2 if isinstance(value, int) else 3): value}
        return cbor2.dumps([cbor_record]), CT_SENML_CBOR
    return str(value).encode(), CT_TEXT


# -- resources ----------------------------------------------------------------------------------


class Value(resource.ObservableResource):
    """A readable, observable resource whose value the client holds."""

    def __init__(self, path: tuple[int, int, int], get: Callable[[], int | str], fmt: str) -> None:
        super().__init__()
        self.path, self._get, self._fmt = path, get, fmt

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        payload, ct = encode(self._fmt, self.path, self._get())
        return aiocoap.Message(code=Code.CONTENT, payload=payload, content_format=ct)


class PackageUri(resource.Resource):
    """/5/0/1: write the URI to download (empty: cancel)."""

    def __init__(self, client: Lwm2mAgent) -> None:
        super().__init__()
        self._client = client

    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        if request.opt.content_format not in (None, CT_TEXT) or len(request.payload) > 255:
            return aiocoap.Message(code=Code.BAD_REQUEST)
        try:
            uri = request.payload.decode()
        except UnicodeDecodeError:
            return aiocoap.Message(code=Code.BAD_REQUEST)
        return aiocoap.Message(code=self._client.on_package_uri(uri))


class Update(resource.Resource):
    """/5/0/2: execute the update of the downloaded package."""

    def __init__(self, client: Lwm2mAgent) -> None:
        super().__init__()
        self._client = client

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=self._client.on_update())


# -- the client ----------------------------------------------------------------------------------


class Lwm2mAgent:
    """One simulated LwM2M device. ``await agent.run()`` until ``agent.stop()`` or cancellation."""

    def __init__(
        self,
        config: DeviceConfig,
        clients: SharedClients,
        *,
        faults: DeviceFaults | None = None,
        start_delay: float = 0.0,
        lifetime: int = 60,
        fmt: str | None = None,
    ) -> None:
        self.config = config
        self.clients = clients
        self.faults = faults or DeviceFaults()
        self.start_delay = start_delay
        self.lifetime = lifetime
        self.fmt = fmt or FORMATS[config.index % len(FORMATS)]
        self.flash = Flash(config.device_dir)
        if not self.flash.exists:
            self.flash.provision(config.factory_image(), config.installed_sequence)
        self.status = AgentStatus(
            config.name,
            config.index,
            config.transport,
            installed_sequence=self.flash.state.installed_sequence,
        )
        self.state = LwState.IDLE
        self.result = Result.INITIAL
        self.uri = ""
        self.updates = 0
        """Updates finished (the simulator's own count: an LwM2M device knows no campaign)."""
        self._ctx: aiocoap.Context | None = None
        self._location: str | None = None
        self._stop = asyncio.Event()
        self._reboot = asyncio.Event()
        self._work: asyncio.Task[None] | None = None
        self._dropped_once = False
        self._values: dict[tuple[int, int, int], Value] = {}
        self.rng = random.Random(f"{config.tenant}/{config.name}")

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def endpoint(self) -> str:
        return f"{self.config.tenant}:{self.config.name}"

    def stop(self) -> None:
        self._stop.set()

    # -- object model ---------------------------------------------------------------------------

    def _site(self) -> resource.Site:
        site = resource.Site()
        values: dict[tuple[int, int, int], Callable[[], int | str]] = {
            (3, 0, 0): lambda: "fwcm-sim",
            (3, 0, 3): self.firmware_version,
            (5, 0, 3): lambda: int(self.state),
            (5, 0, 5): lambda: int(self.result),
        }
        for path, get in values.items():
            self._values[path] = Value(path, get, self.fmt)
            site.add_resource([str(p) for p in path], self._values[path])
        site.add_resource(["5", "0", "1"], PackageUri(self))
        site.add_resource(["5", "0", "2"], Update(self))
        return site

    def firmware_version(self) -> str:
        digest = self.flash.state.slots[self.flash.state.active].digest or ""
        return f"sim-{digest[:12]}"

    def _set(self, *, state: LwState | None = None, result: Result | None = None) -> None:
        """Change State and/or Update Result; observers hear the result first, then the state."""
        if result is not None and result != self.result:
            self.result = result
            self._values[(5, 0, 5)].updated_state()
        if state is not None and state != self.state:
            self.state = state
            self._values[(5, 0, 3)].updated_state()
        self.status.state, self.status.result = self.state, self.result

    # -- registration ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Register, serve the server's requests, keep the registration alive (registering again
        from the same socket when that fails); start over on a new socket after a reboot;
        de-register when stopped."""
        await self._sleep(self.faults.online_delay + self.start_delay)
        while not self._stop.is_set():
            self._reboot.clear()
            try:
                self._ctx = await aiocoap.Context.create_server_context(
                    self._site(), bind=("::", 0), transports=["udp6"]
                )
                await self._serve()
            finally:
                if self._stop.is_set():
                    await self._deregister()
                await self._shutdown()
            if self._reboot.is_set():
                self._boot()

    async def _serve(self) -> None:
        """One power cycle: (re-)register until stopped or rebooted."""
        backoff = 0.5
        while not (self._stop.is_set() or self._reboot.is_set()):
            try:
                await self._register()
                backoff = 0.5
                await self._keep_registered()
            except (TimeoutError, aiocoap.error.Error, OSError, RegistrationRefused) as exc:
                log.info("%s: LwM2M registration failed: %s", self.name, exc)
                self.status.connected = False
                await self._sleep(backoff * (0.5 + self.rng.random()))
                backoff = min(backoff * 2, 10.0)

    async def _register(self) -> None:
        assert self._ctx is not None
        query = f"ep={self.endpoint}&lt={self.lifetime}&lwm2m=1.1&b=U"
        msg = aiocoap.Message(
            code=Code.POST,
            uri=f"{self.config.lwm2m_url}/rd?{query}",
            payload=b'</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>,</5/0>',
            content_format=CT_LINK,
        )
        response = await response_within(self._ctx.request(msg), REQUEST_TIMEOUT_S)
        if response.code != Code.CREATED or not response.opt.location_path:
            raise RegistrationRefused(f"registration answered {response.code}")
        self._location = "/".join(response.opt.location_path)
        self.status.connected = True
        self.status.connects += 1

    async def _keep_registered(self) -> None:
        """Send a registration update every half lifetime until a reboot or stop."""
        while not (self._stop.is_set() or self._reboot.is_set()):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.lifetime / 2):
                    await _first(self._stop.wait(), self._reboot.wait())
            if self._stop.is_set() or self._reboot.is_set():
                return
            assert self._ctx is not None
            msg = aiocoap.Message(code=Code.POST, uri=f"{self.config.lwm2m_url}/{self._location}")
            response = await response_within(self._ctx.request(msg), REQUEST_TIMEOUT_S)
            if response.code != Code.CHANGED:
                raise RegistrationRefused(f"registration update answered {response.code}")

    async def _deregister(self) -> None:
        if self._ctx is None or self._location is None:
            return
        msg = aiocoap.Message(code=Code.DELETE, uri=f"{self.config.lwm2m_url}/{self._location}")
        with contextlib.suppress(TimeoutError, aiocoap.error.Error, OSError):
            await response_within(self._ctx.request(msg), 2.0)
        self._location = None

    async def _shutdown(self) -> None:
        if self._work is not None and self._stop.is_set():
            self._work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._work
        self.status.connected = False
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            await ctx.shutdown()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    # -- firmware update ------------------------------------------------------------------------

    def on_package_uri(self, uri: str) -> Code:
        """A written Package URI: download it; an empty one cancels and resets to Idle."""
        if self._work is not None:
            self._work.cancel()
            self._work = None
        self.uri = uri
        if not uri:
            self.flash.discard_inactive()
            self.flash.save()
            self._set(state=LwState.IDLE, result=Result.INITIAL)
            return Code.CHANGED
        if urlsplit(uri).scheme not in ("coap", "http"):
            self._set(state=LwState.IDLE, result=Result.UNSUPPORTED_PROTOCOL)
            return Code.CHANGED
        self._set(result=Result.INITIAL, state=LwState.DOWNLOADING)
        self._work = asyncio.get_running_loop().create_task(self._download(uri))
        return Code.CHANGED

    def on_update(self) -> Code:
        """Execute Update: only a downloaded package can be installed."""
        if self.state != LwState.DOWNLOADED:
            return Code.METHOD_NOT_ALLOWED
        self._set(state=LwState.UPDATING)
        self._work = asyncio.get_running_loop().create_task(self._install())
        return Code.CHANGED

    async def _step_delay(self) -> None:
        if self.faults.step_delay:
            await asyncio.sleep(self.faults.step_delay)

    async def _download(self, uri: str) -> None:
        """Fetch the package into the inactive slot, resuming after a dropped connection; then
        check its digest (when the URI names it) and report Downloaded or the failure."""
        match = SHA256_IN_URI.search(uri)
        expected = match.group(1).lower() if match else None
        flash, faults = self.flash, self.faults
        pos = flash.begin_download(expected or uri, self.config.flash_size)

        async def sink(at: int, chunk: bytes) -> None:
            nonlocal pos
            if at > pos:
                raise FetchError(f"gap in the package at {at}, expected {pos}")
            if at + len(chunk) > self.config.flash_size:
                raise _Failed(Result.NOT_ENOUGH_FLASH)
            if faults.corrupt and at == 0 and chunk:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            pos = flash.write_chunk(at, chunk)
            if (
                faults.drop_at is not None
                and not self._dropped_once
                and pos >= DROP_AFTER_BYTES * faults.drop_at
            ):
                self._dropped_once = True
                raise FetchError("simulated connection drop")
            if faults.throttle_bps:
                await asyncio.sleep(len(chunk) / faults.throttle_bps)

        try:
            await self._step_delay()
            if faults.out_of_memory:
                raise _Failed(Result.OUT_OF_RAM)
            for attempt in range(DOWNLOAD_TRIES):
                try:
                    await self._fetch(uri, pos, sink)
                    break
                except FetchError as exc:
                    flash.save()
                    if exc.permanent or attempt == DOWNLOAD_TRIES - 1:
                        raise _Failed(
                            Result.INVALID_URI if exc.permanent else Result.CONNECTION_LOST
                        ) from None
                    log.info("%s: download interrupted at %d: %s; resuming", self.name, pos, exc)
                    await asyncio.sleep(min(0.5 * 2**attempt, 10.0) * (0.5 + self.rng.random()))
            digest, size = flash.inactive_digest()
            if expected is not None and digest != expected:
                raise _Failed(Result.INTEGRITY_FAILURE)
            flash.mark_downloaded(digest, size, self.flash.state.installed_sequence + 1)
            flash.save()
            await self._step_delay()
            self._set(state=LwState.DOWNLOADED)
        except _Failed as failed:
            flash.discard_inactive()
            flash.save()
            self._finish(failed.result, LwState.IDLE)

    async def _fetch(self, uri: str, offset: int, sink: Callable[[int, bytes], Any]) -> None:
        if uri.startswith("coap://"):
            assert self._ctx is not None
            async with self.clients.coap_slots:  # as many transfers at once as the CoAP devices
                await fetch_coap(self._ctx, uri, offset, sink)
        else:
            async with self.clients.http_slots:
                await fetch_http(uri, offset, sink, timeout=self.clients.http_timeout)

    async def _install(self) -> None:
        """Install the downloaded package: reboot into it (register again), or fail keeping the
        running image (State back to Downloaded, as LwM2M has it, with Update Result 8)."""
        await self._step_delay()
        if self.faults.install_fail or self.faults.boot_fail:
            self.flash.discard_inactive()
            self.flash.save()
            self._finish(Result.UPDATE_FAILED, LwState.DOWNLOADED)
            return
        self._reboot.set()  # run() shuts the socket, boots the new slot and registers again

    def _boot(self) -> None:
        """The reboot of an install: the new slot runs and is kept; the result is reported when
        the device has registered again."""
        self.flash.activate()
        self.flash.confirm()
        self.flash.save()
        self._finish(Result.SUCCESS, LwState.IDLE, notify=False)

    def _finish(self, result: Result, state: LwState, *, notify: bool = True) -> None:
        self.updates += 1
        self.status.installed_sequence = self.flash.state.installed_sequence
        self.status.results[self.updates] = result
        self.status.detail = f"update {self.updates}: result {result.name}"
        if notify:
            self._set(result=result, state=state)
        else:  # between two registrations: nobody observes
            self.result, self.state = result, state
            self.status.state, self.status.result = state, result


class RegistrationRefused(Exception):
    """The LwM2M server did not register (or update) this client."""


class _Failed(Exception):
    def __init__(self, result: Result) -> None:
        super().__init__(result.name)
        self.result = result


async def _first(*aws: Any) -> None:
    """Wait until the first of ``aws`` completes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
