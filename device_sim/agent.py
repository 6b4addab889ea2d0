"""A simulated device that behaves like update-capable firmware.

One asyncio task tree per device (never a thread): a connection loop (MQTT or CoAP link with
reconnect and backoff), a sender that delivers persisted reports until acknowledged, a dispatcher
for notices, and the parts that act on them: the update job (:mod:`device_sim.update`: verify,
download, install, boot), attestation (:mod:`device_sim.attest`) and consent
(:mod:`device_sim.consent`: invitations, group installs, usage). All of the device's state is
persisted (:mod:`device_sim.flash`), so a killed agent started again on the same ``state_dir``
carries on where it stopped without reusing a report sequence number.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable

from fwcm import protocol
from fwcm.protocol import LwState, Notice, NoticeKind, Report, Result

from .attest import Attestation
from .consent import Consent
from .device import AgentStatus, DeviceConfig
from .faults import DeviceFaults
from .flash import Flash, PersistedState, attempt_key
from .transports import (
    CoapLink,
    Link,
    LinkError,
    MqttLink,
    MqttTarget,
    ReportRejected,
    SharedClients,
    within,
)
from .update import UpdateJob

__all__ = ["AgentStatus", "DeviceAgent", "DeviceConfig"]

log = logging.getLogger(__name__)


class _End(enum.Enum):
    REFUSED = "refused"
    LOST = "lost"
    REBOOT = "reboot"
    DROP = "drop"
    STOP = "stop"


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
        self.coap_refresh = coap_refresh
        self.start_delay = start_delay
        self.stop_flush_timeout = stop_flush_timeout
        self.flash = Flash(config.device_dir)
        if not self.flash.exists:
            self.flash.provision(config.factory_image(), config.installed_sequence)
        self.status = AgentStatus(
            config.name,
            config.index,
            config.transport,
            installed_sequence=self.flash.state.installed_sequence,
            credentials=len(self.flash.state.credentials),
        )
        self.rng = random.Random(f"{config.tenant}/{config.name}")
        self.attestation = Attestation(self, token_timeout=token_timeout)
        self.consent = Consent(self)
        self.updates = UpdateJob(self, self.attestation, self.consent, download_tries=download_tries)
        self._link: Link | None = None
        self._connected = asyncio.Event()
        self._stop = asyncio.Event()
        self._reboot_req = asyncio.Event()
        self._drop_req = asyncio.Event()
        self._outbox_changed = asyncio.Event()
        self._hello: bytes | None = None
        self._notices: asyncio.Queue[Notice] = asyncio.Queue()
        self.handlers: dict[NoticeKind, NoticeHandlerFn] = {
            NoticeKind.UPDATE: self.updates.on_update,
            NoticeKind.CANCEL: self.updates.on_cancel,
            NoticeKind.CREDENTIAL: self.attestation.on_credential,
            NoticeKind.INVITE: self.consent.on_invite,
            NoticeKind.COMMIT: self.updates.on_group_decision,
            NoticeKind.ABORT: self.updates.on_group_decision,
        }
        """Notice kinds this firmware understands; later features register more here."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state(self) -> PersistedState:
        return self.flash.state

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    # -- main loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve notices and reconnect until stopped."""
        job = self.flash.state.job
        if job is not None and job.phase in ("installing", "booted"):
            # Power was lost during the reboot: the bootloader boots the new slot on trial; or
            # during a trial boot, before the image was confirmed: the bootloader falls back.
            self.updates.switch_slot()
        if self.faults.online_delay or self.start_delay:
            await self._sleep(self.faults.online_delay + self.start_delay)
        tasks = [
            asyncio.create_task(self._sender(), name=f"sender-{self.name}"),
            asyncio.create_task(self._dispatcher(), name=f"dispatch-{self.name}"),
            asyncio.create_task(self.consent.run_usage(), name=f"usage-{self.name}"),
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
                    await self._sleep(backoff * (0.5 + self.rng.random()))
                    backoff = min(backoff * 2, self.backoff_max)
        finally:
            await self.updates.shutdown()  # the persisted job is kept for the next start
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
                await self.flush_outbox(self.stop_flush_timeout)  # deliver what is queued first
        finally:
            self._connected.clear()
            self.status.connected = False
            self._link = None
            await link.close(graceful=end is _End.STOP)
        if end is _End.REBOOT:
            self.updates.switch_slot()
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
                **self._running_digest(),
            },
        )
        self.flash.save()
        self._hello = protocol.encode_report(self.config.secret, hello)
        self._connected.set()
        self._outbox_changed.set()
        self.updates.complete_boot()

    # -- reports ----------------------------------------------------------------------------

    def report(
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
        said = dict(extra or {})
        if result in (Result.SUCCESS, Result.REVERTED):  # what the device runs now, confirmed
            said = self._running_digest() | said
        if result == Result.SUCCESS:  # the hello of this boot: earlier ones cannot show a revert
            said = {protocol.REPORT_BOOT_HELLO: st.seq.get(attempt_key(0, 0), 0)} | said
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
            extra=said,
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

    def _running_digest(self) -> dict[int, object]:
        """Report key 15: the SHA-256 of the image running now, when the slot's record has it."""
        digest = self.flash.active_digest()
        return {} if digest is None else {protocol.REPORT_IMAGE_DIGEST: digest}

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

    async def flush_outbox(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until the hello and every queued report were delivered."""
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
        self.report(
            n.campaign,
            n.attempt,
            LwState.IDLE,
            Result.UNSUPPORTED_PROTOCOL,
            detail=f"unsupported notice kind {n.kind.name}",
            finish=True,
        )

    # -- what the parts ask of the connection -----------------------------------------------

    def request_reboot(self) -> None:
        """End the connection to boot the inactive slot (the update job waits for the boot)."""
        self._reboot_req.set()

    def requeue(self, notice: Notice) -> None:
        self._notices.put_nowait(notice)

    async def drop_link(self) -> None:
        """Drop the device's connection (fault injection) and wait until it is back."""
        before = self.status.connects
        self._drop_req.set()
        deadline = time.monotonic() + 30
        while self.status.connects == before and not self._stop.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
