"""A simulated device that behaves like update-capable firmware.

One asyncio task tree per device (never a thread): a connection loop (MQTT or CoAP link with
reconnect and backoff), a sender that delivers persisted reports until acknowledged, a dispatcher
for notices, and at most one update job.  The job does what a bootloader-backed updater does:
verify the SUIT manifest (signature, vendor/class, anti-rollback), fetch the payload into the
inactive slot with resume, check size and digest, report each state change, "reboot" into the
new slot, and report the result.  All of that state is persisted, so a killed agent started again
on the same ``state_dir`` carries on where it stopped without reusing a report sequence number.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlencode

import cbor2

from fwcm import attestation, manifest, pki, protocol
from fwcm.protocol import Accounting, Answer, LwState, Notice, NoticeKind, Report, Result, UsageLimits

from .faults import DeviceFaults
from .flash import Flash, Job, PersistedState, attempt_key
from .transports import (
    CoapLink,
    FetchError,
    Link,
    LinkError,
    MqttLink,
    MqttTarget,
    ReportRejected,
    SharedClients,
    fetch_coap,
    fetch_http,
    order_uris,
    within,
)

log = logging.getLogger(__name__)

Transport = Literal["mqtt", "coap"]
UNAUTHORIZED = (401, 129)
"""HTTP 401 and CoAP 4.01: the payload endpoint refused the install token."""
SAVE_EVERY_BYTES = 32 * 1024
"""During a download the offset is persisted at least this often (and at every interruption)."""


@dataclass
class DeviceConfig:
    """Everything a simulated device is provisioned with."""

    name: str
    tenant: str
    secret: bytes
    vendor_id: uuid.UUID
    class_id: uuid.UUID
    transport: Transport
    trust_anchors: list[bytes]
    """PEM public keys the device accepts manifest signatures from."""
    state_dir: Path
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_ca_file: Path | None = None
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    """The device's broker account as registration returned it; when not given, derived from
    tenant, name and secret (``protocol.broker_username`` / ``device_password``), as firmware may."""
    coap_url: str = "coap://127.0.0.1:5683"
    installed_sequence: int = 0
    hardware_id: str | None = None
    trust_root: bytes | None = None
    """PEM of the operator root CA: when set, manifests must carry a chain that leads to it."""
    attest_key: bytes | None = None
    """PEM private attestation key made at provisioning (its public half is registered)."""
    firmware_name: str = "fwcm-sim"
    index: int = 0
    flash_size: int = 16 * 1024 * 1024
    """Capacity of one slot; larger images are refused with NOT_ENOUGH_FLASH."""

    def mqtt_credentials(self) -> tuple[str, str]:
        return (
            self.mqtt_username or protocol.broker_username(self.tenant, self.name),
            self.mqtt_password or protocol.device_password(self.secret, self.tenant, self.name),
        )

    @property
    def device_dir(self) -> Path:
        return self.state_dir / self.name

    def factory_image(self) -> bytes:
        """The image the device ships with (slot A), distinct per device and sequence."""
        line = f"fwcm-sim factory image device={self.name} sequence={self.installed_sequence}\n".encode()
        return line * 16


class Refusal(Exception):
    """Ends an update attempt with IDLE + ``result``."""

    def __init__(self, result: Result, detail: str) -> None:
        super().__init__(detail)
        self.result = result
        self.detail = detail


class _Dropped(Exception):
    """Injected fault: the connection went away mid-download."""


class _End(enum.Enum):
    REFUSED = "refused"
    LOST = "lost"
    REBOOT = "reboot"
    DROP = "drop"
    STOP = "stop"


@dataclass
class AgentStatus:
    """What a device is doing, for progress displays and checks (not persisted)."""

    name: str
    index: int
    transport: str
    connected: bool = False
    connects: int = 0
    campaign: int = 0
    attempt: int = 0
    state: LwState = LwState.IDLE
    result: Result = Result.INITIAL
    installed_sequence: int = 0
    reports_sent: int = 0
    pending_reports: int = 0
    """Reports queued but not yet acknowledged by the server."""
    detail: str | None = None
    credentials: int = 0
    """Installation credentials held."""
    removed: int = 0
    """Time-limited installs removed again."""
    results: dict[int, Result] = field(default_factory=dict)
    """Final result per campaign (latest attempt)."""


ReportListener = Callable[["DeviceAgent", Report], None]
NoticeHandlerFn = Callable[[Notice], Awaitable[None]]


class DeviceAgent:
    """One simulated device.  ``await agent.run()`` until ``agent.stop()`` or cancellation."""

    def __init__(
        self,
        config: DeviceConfig,
        clients: SharedClients,
        *,
        faults: DeviceFaults | None = None,
        listener: ReportListener | None = None,
        backoff_max: float = 15.0,
        download_tries: int = 6,
        coap_refresh: float = 60.0,
        start_delay: float = 0.0,
        stop_flush_timeout: float = 5.0,
        token_timeout: float = 30.0,
    ) -> None:
        self.config = config
        self.clients = clients
        self.faults = faults or DeviceFaults()
        self.listener = listener
        self.backoff_max = backoff_max
        self.download_tries = download_tries
        self.coap_refresh = coap_refresh
        self.start_delay = start_delay
        self.stop_flush_timeout = stop_flush_timeout
        self.token_timeout = token_timeout
        self.flash = Flash(config.device_dir)
        if not self.flash.exists:
            self.flash.provision(config.factory_image(), config.installed_sequence)
        self._trust = [manifest.load_public_key(pem) for pem in config.trust_anchors]
        self._root = pki.load_cert(config.trust_root) if config.trust_root else None
        self._attest_key = manifest.load_private_key(config.attest_key) if config.attest_key else None
        self._token: bytes | None = None
        self._token_ready = asyncio.Event()
        self._group: dict[int, str] = {}
        """Group installs: the server's decision per campaign ("commit" or "abort")."""
        self._group_changed = asyncio.Event()
        self._usage_started = asyncio.Event()
        self._job_kid: bytes | None = None
        """Key id of the signer of the manifest being installed (a revocation aborts the job)."""
        self.status = AgentStatus(
            config.name,
            config.index,
            config.transport,
            installed_sequence=self.flash.state.installed_sequence,
            credentials=len(self.flash.state.credentials),
        )
        self._rng = random.Random(f"{config.tenant}/{config.name}")
        self._link: Link | None = None
        self._connected = asyncio.Event()
        self._stop = asyncio.Event()
        self._reboot_req = asyncio.Event()
        self._drop_req = asyncio.Event()
        self._booted = asyncio.Event()
        self._outbox_changed = asyncio.Event()
        self._hello: bytes | None = None
        self._notices: asyncio.Queue[Notice] = asyncio.Queue()
        self._job_task: asyncio.Task[None] | None = None
        self._job_notice: Notice | None = None
        self._up_since = time.time()
        """When this run started (RAM): a notice issued before it and not remembered is a replay."""
        self._job_phase = ""
        self._cancel_reason: str | None = None
        self._pending: Notice | None = None
        self._dropped_once = False
        self.handlers: dict[NoticeKind, NoticeHandlerFn] = {
            NoticeKind.UPDATE: self._on_update,
            NoticeKind.CANCEL: self._on_cancel,
            NoticeKind.CREDENTIAL: self._on_credential,
            NoticeKind.INVITE: self._on_invite,
            NoticeKind.COMMIT: self._on_group_decision,
            NoticeKind.ABORT: self._on_group_decision,
        }
        """Notice kinds this firmware understands; later features register more here."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> PersistedState:
        return self.flash.state

    def stop(self) -> None:
        self._stop.set()

    # -- main loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve notices and reconnect until stopped."""
        job = self.flash.state.job
        if job is not None and job.phase == "installing":
            # Power was lost during the reboot: the bootloader boots the new slot.
            self._switch_slot()
        if self.faults.online_delay or self.start_delay:
            await self._sleep(self.faults.online_delay + self.start_delay)
        tasks = [
            asyncio.create_task(self._sender(), name=f"sender-{self.name}"),
            asyncio.create_task(self._dispatcher(), name=f"dispatch-{self.name}"),
            asyncio.create_task(self._usage(), name=f"usage-{self.name}"),
        ]
        backoff = 0.5
        try:
            while not self._stop.is_set():
                try:
                    end = await self._connection(self._make_link())
                except Exception:
                    # whatever a link library raises, the device lives on: log it, start over
                    log.warning("%s: link failed; reconnecting", self.name, exc_info=True)
                    self._connected.clear()
                    self.status.connected = False
                    end = _End.LOST
                if end is not _End.REFUSED:
                    backoff = 0.5  # the link was up: start backing off afresh
                if end in (_End.REFUSED, _End.LOST):
                    await self._sleep(backoff * (0.5 + self._rng.random()))
                    backoff = min(backoff * 2, self.backoff_max)
        finally:
            if self._job_task is not None and not self._job_task.done():
                self._cancel_reason = None  # shutdown: keep the persisted job for the next start
                self._job_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._job_task
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            if self._link is not None:
                await self._link.close(graceful=True)
                self._link = None
            self.flash.save()

    async def _connection(self, link: Link) -> _End:
        """One connection: open the link, serve it until it ends, close it."""
        try:
            await link.open(self._on_raw_notice)
        except LinkError as exc:
            log.debug("%s: connect failed: %s", self.name, exc)
            await link.close(graceful=False)
            return _End.REFUSED
        self._link = link
        self.status.connected = True
        self.status.connects += 1
        end = _End.LOST
        try:
            self._on_connected()
            end = await self._session(link)
            if end is _End.STOP:
                await self._flush_outbox(self.stop_flush_timeout)  # deliver what is queued first
        finally:
            self._connected.clear()
            self.status.connected = False
            self._link = None
            await link.close(graceful=end is _End.STOP)
        if end is _End.REBOOT:
            self._switch_slot()
            self._reboot_req.clear()
        elif end is _End.DROP:
            self._drop_req.clear()
            await self._sleep(0.2)
        elif end is _End.LOST:
            log.info("%s: connection lost; reconnecting", self.name)
        return end

    def _make_link(self) -> Link:
        c = self.config
        if c.transport == "mqtt":
            username, password = c.mqtt_credentials()
            target = MqttTarget.parse(c.mqtt_url, c.mqtt_ca_file).with_credentials(username, password)
            return MqttLink(target, c.tenant, c.name)
        if c.transport == "coap":
            password = protocol.device_password(c.secret, c.tenant, c.name)
            return CoapLink(
                self.clients, c.coap_url, c.tenant, c.name, password=password, refresh=self.coap_refresh
            )
        raise ValueError(f"unknown transport {c.transport!r}")

    async def _session(self, link: Link) -> _End:
        waits = {
            asyncio.create_task(self._stop.wait()): _End.STOP,
            asyncio.create_task(self._reboot_req.wait()): _End.REBOOT,
            asyncio.create_task(self._drop_req.wait()): _End.DROP,
            asyncio.create_task(link.wait_closed()): _End.LOST,
        }
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                t.cancel()
        ends = {waits[t] for t in done}
        for end in (_End.STOP, _End.REBOOT, _End.DROP, _End.LOST):
            if end in ends:
                return end
        return _End.LOST

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await within(self._stop.wait(), seconds)

    def _on_connected(self) -> None:
        st = self.flash.state
        hello = Report(
            self.name,
            0,
            0,
            st.next_seq(0, 0),
            LwState.IDLE,
            Result.INITIAL,
            installed_sequence=st.installed_sequence,
            extra={
                protocol.REPORT_FIRMWARE_NAME: self.config.firmware_name,
                protocol.REPORT_FIRMWARE_VERSION: f"1.0.{st.installed_sequence}",
            },
        )
        self.flash.save()
        self._hello = protocol.encode_report(self.config.secret, hello)
        self._connected.set()
        self._outbox_changed.set()
        self._complete_boot()

    def _switch_slot(self) -> None:
        """The "reboot": boot the inactive slot, which holds the verified new image."""
        job = self.flash.state.job
        if job is None or job.phase != "installing":
            return
        self.flash.activate()
        job.phase = "booted"
        self.flash.save()
        self.status.installed_sequence = self.flash.state.installed_sequence
        log.info("%s: booted slot %s (sequence %d)", self.name, self.flash.state.active, job.sequence)

    def _complete_boot(self) -> None:
        """After booting a new image: report SUCCESS for the attempt that installed it."""
        job = self.flash.state.job
        if job is None or job.phase != "booted":
            return
        if job.limits:
            now = time.time()
            self._usage_started.set()
            self.flash.state.usage[str(job.campaign)] = {
                "attempt": job.attempt,
                "since": now,
                "last": now,
                "uses": 0,
                **job.limits,
            }
        self._report(job.campaign, job.attempt, LwState.IDLE, Result.SUCCESS, finish=True)
        self._booted.set()

    # -- reports ----------------------------------------------------------------------------

    def _report(
        self,
        campaign: int,
        attempt: int,
        state: LwState,
        result: Result = Result.INITIAL,
        *,
        progress: int | None = None,
        detail: str | None = None,
        finish: bool = False,
        extra: dict[int, object] | None = None,
    ) -> Report:
        """Queue a report: its seq is taken and the outbox persisted before anything is sent."""
        st = self.flash.state
        report = Report(
            self.name,
            campaign,
            attempt,
            st.next_seq(campaign, attempt),
            state,
            result,
            progress=progress,
            detail=detail,
            installed_sequence=st.installed_sequence,
            extra=dict(extra or {}),
        )
        st.outbox.append(protocol.encode_report(self.config.secret, report).hex())
        self.status.pending_reports = len(st.outbox)
        if finish:
            st.finish(campaign, attempt, int(result))
            self.status.results[campaign] = result
        self.flash.save()
        self._outbox_changed.set()
        s = self.status
        s.campaign, s.attempt, s.state, s.result, s.detail = campaign, attempt, state, result, detail
        s.installed_sequence = st.installed_sequence
        log.debug(
            "%s: report c%d a%d #%d %s %s", self.name, campaign, attempt, report.seq, state.name, result.name
        )
        if self.listener is not None:
            self.listener(self, report)
        return report

    async def _sender(self) -> None:
        """Deliver the hello and the persisted outbox in order, each until acknowledged."""
        backoff = 0.2
        while True:
            await self._connected.wait()
            link = self._link
            st = self.flash.state
            if self._hello is not None:
                data, from_outbox = self._hello, False
            elif st.outbox:
                data, from_outbox = bytes.fromhex(st.outbox[0]), True
            else:
                self._outbox_changed.clear()
                await self._outbox_changed.wait()
                continue
            if link is None:
                await asyncio.sleep(0.05)
                continue
            try:
                await link.send(data)
            except ReportRejected as exc:
                log.error("%s: %s", self.name, exc)
            except LinkError as exc:
                log.debug("%s: report not delivered yet: %s", self.name, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            self.status.reports_sent += 1
            if from_outbox:
                if st.outbox and st.outbox[0] == data.hex():
                    st.outbox.pop(0)
                self.status.pending_reports = len(st.outbox)
            else:
                self._hello = None

    async def _flush_outbox(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (self.flash.state.outbox or self._hello is not None) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # -- notices ----------------------------------------------------------------------------

    def _on_raw_notice(self, data: bytes) -> None:
        try:
            notice = protocol.decode_notice(data, self.config.secret)
        except protocol.ProtocolError as exc:
            log.warning("%s: notice dropped (%s): %s", self.name, exc.reason, exc)
            return
        if notice.device != self.name:
            log.warning("%s: notice addressed to %r dropped", self.name, notice.device)
            return
        log.debug(
            "%s: %s notice, campaign %d attempt %d",
            self.name,
            notice.kind.name,
            notice.campaign,
            notice.attempt,
        )
        self._notices.put_nowait(notice)

    async def _dispatcher(self) -> None:
        while True:
            notice = await self._notices.get()
            handler = self.handlers.get(notice.kind)
            try:
                if handler is None:
                    await self._on_unsupported(notice)
                else:
                    await handler(notice)
            except Exception:
                log.exception("%s: handling %s notice failed", self.name, notice.kind.name)

    async def _on_unsupported(self, n: Notice) -> None:
        """A notice kind this firmware does not implement: refuse it once, explicitly."""
        if self.flash.state.is_finished(n.campaign, n.attempt):
            return
        log.warning("%s: unsupported notice kind %s", self.name, n.kind.name)
        self._report(
            n.campaign,
            n.attempt,
            LwState.IDLE,
            Result.UNSUPPORTED_PROTOCOL,
            detail=f"unsupported notice kind {n.kind.name}",
            finish=True,
        )

    def _job_running(self) -> bool:
        return self._job_task is not None and not self._job_task.done()

    async def _on_update(self, n: Notice) -> None:
        st = self.flash.state
        if st.is_finished(n.campaign, n.attempt):
            # A notice issued after the one this device acted on is the server asking again: it
            # has not heard the final report (a server replica died holding it), so say it again.
            # The same notice replayed (the retained message after a reboot or restart) needs no
            # answer; after a restart the device only knows that notices from before it are old.
            acted = self._job_notice
            if acted is not None and (acted.campaign, acted.attempt) == (n.campaign, n.attempt):
                asked_again = n.issued > acted.issued
            else:
                asked_again = n.issued > self._up_since
            outcome = Result(st.outcomes[attempt_key(n.campaign, n.attempt)])
            if asked_again and outcome != Result.INITIAL:
                self._report(n.campaign, n.attempt, LwState.IDLE, outcome)
            return
        if self._job_running():
            current = self._job_notice
            assert current is not None
            if (current.campaign, current.attempt) == (n.campaign, n.attempt):
                token = n.extra.get(protocol.NOTICE_TOKEN)
                if isinstance(token, bytes):
                    self._token = token
                    self._token_ready.set()
                return  # duplicate delivery
            if self._job_phase in ("installing", "booted"):
                self._pending = n  # finish the install first
                return
            await self._cancel_job("superseded")
        job = st.job
        if job is not None and job.phase == "booted":
            self._complete_boot()
            if st.is_finished(n.campaign, n.attempt):
                return
        self._start_job(n)

    def _start_job(self, n: Notice) -> None:
        self._job_notice = n
        self._job_phase = "verifying"
        self._cancel_reason = None
        self._job_task = asyncio.create_task(self._job(n), name=f"job-{self.name}-{n.campaign}.{n.attempt}")
        self._job_task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: update job crashed", self.name, exc_info=task.exception())
        if self._pending is not None and not self._stop.is_set():
            pending, self._pending = self._pending, None
            self._notices.put_nowait(pending)

    async def _cancel_job(self, reason: str) -> None:
        task = self._job_task
        if task is None or task.done():
            return
        self._cancel_reason = reason
        while not task.done():  # cancel again should a library have swallowed the cancellation
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    async def _on_cancel(self, n: Notice) -> None:
        st = self.flash.state
        if self._job_running():
            current = self._job_notice
            assert current is not None
            if current.campaign != n.campaign:
                return
            if self._job_phase in ("installing", "booted"):
                log.info("%s: cancel ignored, already installing", self.name)
                return
            reason = n.extra.get(protocol.NOTICE_REASON)
            if self._job_kid is not None and self._job_kid in n.revoked:
                reason = "signer revoked: the image is refused"
            await self._cancel_job(reason if isinstance(reason, str) else "cancelled")
            return
        job = st.job
        if job is not None and job.campaign == n.campaign:
            if job.phase in ("installing", "booted"):
                return
            self.flash.discard_inactive()
            self._report(job.campaign, job.attempt, LwState.IDLE, Result.CANCELLED, finish=True)
            return
        if not st.is_finished(n.campaign, n.attempt):
            self._report(n.campaign, n.attempt, LwState.IDLE, Result.CANCELLED, finish=True)

    # -- the update job ---------------------------------------------------------------------

    async def _job(self, n: Notice) -> None:
        try:
            await self._update(n)
        except Refusal as r:
            log.info("%s: campaign %d refused: %s (%s)", self.name, n.campaign, r.result.name, r.detail)
            if self._job_phase in ("downloading", "downloaded", "installing"):
                self.flash.discard_inactive()  # nothing half-written survives; the active slot is untouched
            self.flash.state.job = None
            self._report(n.campaign, n.attempt, LwState.IDLE, r.result, detail=r.detail, finish=True)
        except asyncio.CancelledError:
            reason = self._cancel_reason
            if reason is not None:
                self.flash.discard_inactive()
                result = Result.CANCELLED
                if reason.startswith("attestation refused"):
                    result = Result.ATTESTATION_REFUSED
                elif reason.startswith("signer revoked"):
                    result = Result.SIGNER_REVOKED
                self._report(n.campaign, n.attempt, LwState.IDLE, result, detail=reason, finish=True)
            else:
                self.flash.save()
            raise

    def _set_phase(self, job: Job, phase: str) -> None:
        job.phase = phase
        self._job_phase = phase

    async def _update(self, n: Notice) -> None:
        st = self.flash.state
        existing = st.job if st.job is not None and st.job.key == f"{n.campaign}:{n.attempt}" else None
        if n.envelope is None:
            raise Refusal(Result.UNSUPPORTED_PACKAGE, "update notice without a manifest")
        try:
            env = manifest.decode_envelope(n.envelope)
        except manifest.ManifestError as exc:
            raise Refusal(Result.UNSUPPORTED_PACKAGE, f"manifest: {exc}") from None
        kid = self._job_kid = self._verify_signer(env)
        if n.revoked and kid in n.revoked:
            raise Refusal(Result.SIGNER_REVOKED, "manifest signed by a revoked key")
        info = env.info
        if info.vendor_id != self.config.vendor_id or info.class_id != self.config.class_id:
            raise Refusal(Result.CONDITION_MISMATCH, "vendor or class identifier does not match")
        if info.sequence <= st.installed_sequence:
            if info.sequence == st.installed_sequence:
                raise Refusal(Result.UP_TO_DATE, f"sequence {info.sequence} already installed")
            raise Refusal(
                Result.ROLLBACK_REFUSED, f"sequence {info.sequence} is older than {st.installed_sequence}"
            )
        if info.image_size > self.config.flash_size:
            raise Refusal(Result.NOT_ENOUGH_FLASH, f"image of {info.image_size} bytes does not fit")
        digest = info.image_digest.hex()
        resume_install = (
            existing is not None
            and existing.phase in ("downloaded", "installing")
            and st.slots[st.inactive].digest == digest
        )
        if existing is not None and existing.digest == digest:
            job = existing
        else:
            job = Job(n.campaign, n.attempt, "downloading", info.sequence, digest, info.image_size)
        job.limits = _limits(n.limits)
        if n.extra.get(protocol.NOTICE_PREPARE):
            job.notice = cbor2.dumps(n.to_map()).hex()
        st.job = job
        self.flash.save()
        await self._step_delay()

        if not resume_install:
            if n.nonce is not None:
                await self._attest(n, env.digest)
            self._set_phase(job, "downloading")
            await self._download(n, job, list(info.uris))
            got, got_size = self.flash.inactive_digest()
            if got_size != info.image_size or got != digest:
                raise Refusal(Result.INTEGRITY_FAILURE, f"image digest/size mismatch ({got_size} bytes)")
            self._set_phase(job, "downloaded")
            self.flash.mark_downloaded(digest, info.image_size, info.sequence)
            self._report(n.campaign, n.attempt, LwState.DOWNLOADED, progress=100)
            await self._step_delay()

        if n.extra.get(protocol.NOTICE_PREPARE):
            await self._wait_for_commit(n)
        await self._wait_for_window(n)
        self._set_phase(job, "installing")
        self._report(n.campaign, n.attempt, LwState.UPDATING)
        await self._step_delay()
        if self.faults.install_fail:
            self.flash.discard_inactive()
            raise Refusal(Result.UPDATE_FAILED, "simulated install failure; previous image kept")
        await self._flush_outbox(5.0)
        self._booted.clear()
        self._reboot_req.set()
        await self._booted.wait()

    def _verify_signer(self, env: manifest.Envelope) -> bytes:
        """Check who signed: through the certificate chain to the provisioned root when there is
        one (a developer build must list this device's hardware ID), else against the trusted
        keys. Returns the signer's key id."""
        if self._root is None:
            try:
                return manifest.key_id(manifest.verify_envelope(env, self._trust))
            except manifest.SignatureError as exc:
                raise Refusal(Result.SIGNATURE_INVALID, f"signature: {exc}") from None
        try:
            signer = pki.verify_manifest(env, self._root)
        except pki.ChainError as exc:
            raise Refusal(Result.CHAIN_INVALID, f"certificate chain ({exc.reason}): {exc}") from None
        except manifest.SignatureError as exc:
            raise Refusal(Result.SIGNATURE_INVALID, f"signature: {exc}") from None
        if signer.hardware_ids is not None and self.config.hardware_id not in signer.hardware_ids:
            raise Refusal(
                Result.HARDWARE_NOT_LISTED,
                f"developer build of {signer.name!r} is not for hardware {self.config.hardware_id!r}",
            )
        return signer.key_id

    async def _attest(self, n: Notice, manifest_digest: bytes) -> None:
        """Prove this device with its attestation key over the server's nonce, then wait for the
        install token the payload endpoints ask for."""
        assert n.nonce is not None
        if n.extra.get(protocol.NOTICE_TOKEN) is not None:
            token = n.extra[protocol.NOTICE_TOKEN]
            self._token = token if isinstance(token, bytes) else None
            if self._token is not None:
                return  # attested before a restart: the notice already carries the token
        if self._attest_key is None:
            raise Refusal(Result.ATTESTATION_REFUSED, "this device has no attestation key")
        self._token, self._token_ready = None, asyncio.Event()
        st = self.flash.state
        evidence = self._evidence(n.nonce, manifest_digest)
        st.evidence = evidence.hex()
        self._set_phase_name("attesting")
        self._report(n.campaign, n.attempt, LwState.IDLE, extra={protocol.REPORT_EVIDENCE: evidence})
        try:
            await within(self._token_ready.wait(), self.token_timeout)
        except TimeoutError:
            raise Refusal(Result.ATTESTATION_REFUSED, "no install token after attesting") from None

    def _evidence(self, nonce: bytes, manifest_digest: bytes) -> bytes:
        assert self._attest_key is not None
        st = self.flash.state
        if self.faults.attest_replay:
            if st.evidence is not None:
                return bytes.fromhex(st.evidence)  # an attestation recorded earlier, replayed
            nonce = hashlib.sha256(b"recorded " + nonce).digest()[:16]  # a nonce of another time
        key = manifest.generate_private_key("es256") if self.faults.attest_forged else self._attest_key
        active = image_sha256(self.flash.active_image())
        ev = attestation.Evidence(nonce, self.name, bytes.fromhex(active), manifest_digest)
        return attestation.make_evidence(key, ev)

    async def _wait_for_commit(self, n: Notice) -> None:
        """Group install: prepared (downloaded and verified); install only on the group's commit."""
        log.info("%s: prepared for group install of campaign %d; waiting for commit", self.name, n.campaign)
        while n.campaign not in self._group:
            self._group_changed.clear()
            await self._group_changed.wait()
        if self._group[n.campaign] != "commit":
            raise Refusal(Result.CANCELLED, "group aborted: the image is discarded")

    async def _on_group_decision(self, n: Notice) -> None:
        decision = "commit" if n.kind == NoticeKind.COMMIT else "abort"
        self._group[n.campaign] = decision
        self._group_changed.set()
        if self._job_running():
            return  # the running job is waiting for exactly this
        st = self.flash.state
        job = st.job
        if job is None or job.campaign != n.campaign or job.phase not in ("downloading", "downloaded"):
            return
        if decision == "commit" and job.phase == "downloaded" and job.notice is not None:
            stored = protocol.Notice.from_map(cbor2.loads(bytes.fromhex(job.notice)))
            self._start_job(stored)  # restarted while prepared: the commit is durable, install now
            return
        self.flash.discard_inactive()
        st.job = None
        self._report(
            job.campaign, job.attempt, LwState.IDLE, Result.CANCELLED, detail="group aborted", finish=True
        )

    async def _on_invite(self, n: Notice) -> None:
        """Answer an invitation as this device's owner would (the fault profile decides)."""
        if self.flash.state.is_finished(n.campaign, n.attempt):
            return
        invitation = n.invitation
        offered = invitation.options if invitation is not None and invitation.options else {}
        answer = self.faults.consent
        if answer == "ignore":
            log.info("%s: invitation to campaign %d left unanswered", self.name, n.campaign)
            return
        if answer == "decline":
            self._report(
                n.campaign,
                n.attempt,
                LwState.IDLE,
                Result.DECLINED,
                extra={protocol.REPORT_ANSWER: Answer(accepted=False).to_map()},
                finish=True,
            )
            return
        choice = {}
        for option, values in offered.items():
            wanted = self.faults.choice.get(option)
            choice[option] = wanted if wanted in values else values[0]
        self._report(
            n.campaign,
            n.attempt,
            LwState.IDLE,
            extra={protocol.REPORT_ANSWER: Answer(accepted=True, choice=choice).to_map()},
            finish=True,
        )

    async def _usage(self) -> None:
        """Installed software in use: count uses, send accounting, remove it at its limit."""
        while True:
            st = self.flash.state
            if not st.usage:  # nothing installed with limits: sleep until something is
                self._usage_started.clear()
                await self._usage_started.wait()
            await asyncio.sleep(0.25)
            for key, u in list(st.usage.items()):
                now = time.time()
                every = float(u.get("every") or 1.0)
                if now - u["last"] < every:
                    continue
                u["last"] = now
                u["uses"] += 1
                expired = "expires" in u and now - u["since"] >= u["expires"]
                used_up = "max_uses" in u and u["uses"] >= u["max_uses"]
                if expired or used_up:
                    self._remove(int(key), u, "use limit reached" if used_up else "time limit reached")
                elif u.get("every"):
                    self._account(int(key), u, "interim")
                else:
                    self.flash.save()

    def _account(self, campaign: int, u: dict[str, float], kind: str, detail: str | None = None) -> None:
        record = Accounting(kind, int(u["uses"]), int(time.time() - u["since"]), detail or None)
        self._report(
            campaign,
            int(u["attempt"]),
            LwState.IDLE,
            Result.SUCCESS,
            extra={protocol.REPORT_ACCOUNTING: record.to_map()},
        )

    def _remove(self, campaign: int, u: dict[str, float], why: str) -> None:
        """Time-limited install ended: boot the previous slot again and say so."""
        st = self.flash.state
        try:
            self.flash.activate()
        except RuntimeError:
            log.warning("%s: nothing to return to; keeping the installed software", self.name)
        st.usage.pop(str(campaign), None)
        self.status.installed_sequence = st.installed_sequence
        self.status.removed += 1
        log.info(
            "%s: software of campaign %d removed (%s); back on sequence %d",
            self.name,
            campaign,
            why,
            st.installed_sequence,
        )
        self._account(campaign, u, "removed", why)

    def _set_phase_name(self, phase: str) -> None:
        self._job_phase = phase

    async def _on_credential(self, n: Notice) -> None:
        """Keep the server-signed installation credential of an install this device made."""
        data = n.extra.get(protocol.NOTICE_CREDENTIAL)
        if not isinstance(data, bytes) or str(n.campaign) in self.flash.state.credentials:
            return
        self.flash.state.credentials[str(n.campaign)] = data.hex()
        self.flash.save()
        self.status.credentials = len(self.flash.state.credentials)
        log.info("%s: installation credential for campaign %d stored", self.name, n.campaign)

    async def _wait_for_window(self, n: Notice) -> None:
        """Download now, install later: keep the downloaded image until the install window opens."""
        if n.window is None:
            return
        delay = n.window[0] - time.time()
        if delay > 0:
            log.info("%s: installing when the window opens in %.0f s", self.name, delay)
            await asyncio.sleep(delay)

    async def _step_delay(self) -> None:
        if self.faults.step_delay:
            await asyncio.sleep(self.faults.step_delay)

    async def _download(self, n: Notice, job: Job, uris: list[str]) -> None:
        """Fetch the image into the inactive slot, resuming from the persisted offset."""
        size = job.size
        offset = self.flash.begin_download(job.digest, size)
        self._report(n.campaign, n.attempt, LwState.DOWNLOADING, progress=offset * 100 // max(size, 1))
        candidates = order_uris(uris, self.config.transport)
        if not candidates:
            raise Refusal(Result.UNSUPPORTED_PROTOCOL, f"no usable payload URI in {uris}")
        pos = offset
        saved = offset
        next_progress = 25

        async def sink(at: int, chunk: bytes) -> None:
            nonlocal pos, saved, next_progress
            if at > pos:
                raise FetchError(f"gap in payload stream at {at}, expected {pos}")
            end = at + len(chunk)
            if end > size:
                raise Refusal(Result.INTEGRITY_FAILURE, f"payload longer than the manifest's {size} bytes")
            if self.faults.corrupt and at <= size // 2 < end:
                i = size // 2 - at
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
            pos = self.flash.write_chunk(at, chunk)
            if pos - saved >= SAVE_EVERY_BYTES:
                self.flash.save()
                saved = pos
            if size >= 256 * 1024 and pos * 100 // size >= next_progress and pos < size:
                self._report(n.campaign, n.attempt, LwState.DOWNLOADING, progress=pos * 100 // size)
                next_progress += 25
            fraction = self.faults.drop_at
            if fraction is not None and not self._dropped_once and pos >= size * fraction and pos < size:
                self._dropped_once = True
                raise _Dropped()
            if self.faults.throttle_bps:
                await asyncio.sleep(len(chunk) / self.faults.throttle_bps)

        tries = 0
        permanent: list[str] = []
        while True:
            for uri in [u for u in candidates if u not in permanent]:
                try:
                    await self._fetch(uri, pos, sink)
                except _Dropped:
                    self.flash.save()
                    log.info("%s: connection dropped at %d/%d bytes; resuming", self.name, pos, size)
                    await self._drop_link()
                    break
                except FetchError as exc:
                    self.flash.save()
                    log.info("%s: fetch %s failed at %d: %s", self.name, uri, pos, exc)
                    if exc.status in UNAUTHORIZED:
                        raise Refusal(Result.ATTESTATION_REFUSED, f"install token refused: {exc}") from None
                    if exc.permanent:
                        permanent.append(uri)
                    continue
                if pos == size:
                    self.flash.save()
                    return
                log.info("%s: %s ended early at %d of %d bytes", self.name, uri, pos, size)
            else:
                if len(permanent) == len(candidates):
                    raise Refusal(Result.INVALID_URI, "no payload URI could be fetched")
                tries += 1
                if tries >= self.download_tries:
                    raise Refusal(Result.CONNECTION_LOST, f"download failed {tries} times at {pos}/{size}")
                await asyncio.sleep(min(0.5 * 2**tries, 10.0) * (0.5 + self._rng.random()))

    async def _fetch(self, uri: str, offset: int, sink: Callable[[int, bytes], Awaitable[None]]) -> None:
        if self._token is not None:
            query = urlencode({"d": f"{self.config.tenant}/{self.name}", "t": attestation.b64(self._token)})
            uri = f"{uri}{'&' if '?' in uri else '?'}{query}"
        if uri.startswith("coap://"):
            async with self.clients.coap_slots:
                await fetch_coap(await self.clients.coap(self.name), uri, offset, sink)
        else:
            async with self.clients.http_slots:
                await fetch_http(uri, offset, sink, timeout=self.clients.http_timeout)

    async def _drop_link(self) -> None:
        """Drop the device's connection (fault injection) and wait until it is back."""
        before = self.status.connects
        self._drop_req.set()
        deadline = time.monotonic() + 30
        while self.status.connects == before and not self._stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def _limits(limits: UsageLimits | None) -> dict[str, float] | None:
    """Usage limits and accounting interval from an update notice, as the job persists them."""
    if limits is None:
        return None
    given = {
        "max_uses": limits.max_uses,
        "expires": limits.expires_after_s,
        "every": limits.accounting_every_s,
    }
    out = {name: float(x) for name, x in given.items() if x is not None and x > 0}
    return out or None


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
