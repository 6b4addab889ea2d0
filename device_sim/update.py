"""The update job: what a bootloader-backed updater does with an update notice.

Verify the SUIT manifest (signature or certificate chain, revocations, vendor/class, anti-rollback,
size), attest when the notice asks, fetch the payload into the inactive slot with resume, check
size and digest, wait for a group's commit or the install window, report each state change,
"reboot" into the new slot on trial, run the health check and confirm the image (or reset
unconfirmed, so the bootloader falls back) and only then report the result. Every step is
persisted, so an agent started again on the same state carries on where it stopped. Cancel
notices stop a job that has not begun to install; a newer notice supersedes one that has not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

import cbor2

from fwcm import attestation, delta, manifest, pki, protocol
from fwcm.protocol import LwState, Notice, NoticeKind, Result

from .attest import Attestation
from .consent import GROUP_ABORT, GROUP_COMMIT, Consent, usage_limits
from .device import Device, Refusal
from .flash import Job, attempt_key
from .transports import FetchError, fetch_coap, fetch_http, order_uris

log = logging.getLogger(__name__)

UNAUTHORIZED = (401, 129)
"""HTTP 401 and CoAP 4.01: the payload endpoint refused the install token."""
PATCH_PART = "patch"
"""The inactive slot's file a delta manifest's patch is fetched into (the temporary component)."""
SAVE_EVERY_BYTES = 32 * 1024
"""During a download the offset is persisted at least this often (and at every interruption)."""


class _Dropped(Exception):
    """Injected fault: the connection went away mid-download."""


def part_name(component_id: tuple[bytes, ...]) -> str:
    """A further component's name in the slot ("c" and its identifier's parts in hex): a file name part."""
    return "c" + "-".join(p.hex() for p in component_id)


class UpdateJob:
    """At most one update attempt at a time, and the notices that start, supersede or stop it."""

    def __init__(
        self, device: Device, attest: Attestation, consent: Consent, *, download_tries: int = 6
    ) -> None:
        self.device = device
        self.attestation = attest
        self.consent = consent
        self.download_tries = download_tries
        config = device.config
        self._trust = [manifest.load_public_key(pem) for pem in config.trust_anchors]
        self._root = pki.load_cert(config.trust_root) if config.trust_root else None
        self._task: asyncio.Task[None] | None = None
        self._notice: Notice | None = None
        """The notice of the job running (or last run)."""
        self._phase = ""
        self._cancel_reason: str | None = None
        self._pending: Notice | None = None
        """An update notice that arrived while installing: handled once the install is done."""
        self._kid: bytes | None = None
        """Key id of the signer of the manifest being installed (a revocation aborts the job)."""
        self._booted = asyncio.Event()
        self._dropped_once = False
        self._up_since = time.time()
        """When this run started (RAM): a notice issued before it and not remembered is a replay."""

    @property
    def name(self) -> str:
        return self.device.config.name

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- notices ----------------------------------------------------------------------------

    async def on_update(self, n: Notice) -> None:
        st = self.device.flash.state
        if st.is_finished(n.campaign, n.attempt) and not self.device.faults.accept_replays:
            # A notice issued after the one this device acted on is the server asking again: it
            # has not heard the final report (a server replica died holding it), so say it again.
            # The same notice replayed (the retained message after a reboot or restart) needs no
            # answer; after a restart the device only knows that notices from before it are old.
            acted = self._notice
            if acted is not None and (acted.campaign, acted.attempt) == (n.campaign, n.attempt):
                asked_again = n.issued > acted.issued
            else:
                asked_again = n.issued > self._up_since
            outcome = Result(st.outcomes[attempt_key(n.campaign, n.attempt)])
            if asked_again and outcome != Result.INITIAL:
                self.device.report(n.campaign, n.attempt, LwState.IDLE, outcome)
            return
        if self.running():
            current = self._notice
            assert current is not None
            if (current.campaign, current.attempt) == (n.campaign, n.attempt):
                self.attestation.take_token(n)
                return  # duplicate delivery
            if self._phase in ("installing", "booted"):
                self._pending = n  # finish the install first
                return
            await self._cancel("superseded")
        job = st.job
        if job is not None and job.phase in ("booted", "reverted"):
            self.complete_boot()
            if st.is_finished(n.campaign, n.attempt):
                return
        self._start(n)

    async def on_cancel(self, n: Notice) -> None:
        st = self.device.flash.state
        if self.running():
            current = self._notice
            assert current is not None
            if current.campaign != n.campaign:
                return
            if self._phase in ("installing", "booted"):
                log.info("%s: cancel ignored, already installing", self.name)
                return
            reason = n.extra.get(protocol.NOTICE_REASON)
            if self._kid is not None and self._kid in n.revoked:
                reason = "signer revoked: the image is refused"
            await self._cancel(reason if isinstance(reason, str) else "cancelled")
            return
        job = st.job
        if job is not None and job.campaign == n.campaign:
            if job.phase in ("installing", "booted", "reverted"):
                return
            self.device.flash.discard_inactive()
            self.device.report(job.campaign, job.attempt, LwState.IDLE, Result.CANCELLED, finish=True)
            return
        if not st.is_finished(n.campaign, n.attempt):
            self.device.report(n.campaign, n.attempt, LwState.IDLE, Result.CANCELLED, finish=True)

    async def on_group_decision(self, n: Notice) -> None:
        """A group install's commit or abort: the job waiting for it goes on, or a job prepared
        before a restart installs (commit) or is discarded."""
        decision = GROUP_COMMIT if n.kind == NoticeKind.COMMIT else GROUP_ABORT
        self.consent.decide(n.campaign, decision)
        if self.running():
            return  # the running job is waiting for exactly this
        st = self.device.flash.state
        job = st.job
        if job is None or job.campaign != n.campaign or job.phase not in ("downloading", "downloaded"):
            return
        if decision == GROUP_COMMIT and job.phase == "downloaded" and job.notice is not None:
            stored = protocol.Notice.from_map(cbor2.loads(bytes.fromhex(job.notice)))
            self._start(stored)  # restarted while prepared: the commit is durable, install now
            return
        self.device.flash.discard_inactive()
        st.job = None
        self.device.report(
            job.campaign, job.attempt, LwState.IDLE, Result.CANCELLED, detail="group aborted", finish=True
        )

    # -- the job task -----------------------------------------------------------------------

    def _start(self, n: Notice) -> None:
        self._notice = n
        self._phase = "verifying"
        self._cancel_reason = None
        self._task = asyncio.create_task(self._run(n), name=f"job-{self.name}-{n.campaign}.{n.attempt}")
        self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: update job crashed", self.name, exc_info=task.exception())
        if self._pending is not None and not self.device.stopping:
            pending, self._pending = self._pending, None
            self.device.requeue(pending)

    async def _cancel(self, reason: str) -> None:
        task = self._task
        if task is None or task.done():
            return
        self._cancel_reason = reason
        while not task.done():  # cancel again should a library have swallowed the cancellation
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)

    async def shutdown(self) -> None:
        """The agent stops: end the running job, keeping its persisted state for the next start."""
        if self._task is not None and not self._task.done():
            self._cancel_reason = None
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, n: Notice) -> None:
        device = self.device
        try:
            await self._update(n)
        except Refusal as r:
            log.info("%s: campaign %d refused: %s (%s)", self.name, n.campaign, r.result.name, r.detail)
            if self._phase in ("downloading", "downloaded", "installing"):
                device.flash.discard_inactive()  # nothing half-written survives; the active slot is untouched
            device.flash.state.job = None
            device.report(n.campaign, n.attempt, LwState.IDLE, r.result, detail=r.detail, finish=True)
        except asyncio.CancelledError:
            reason = self._cancel_reason
            if reason is not None:
                device.flash.discard_inactive()
                result = Result.CANCELLED
                if reason.startswith("attestation refused"):
                    result = Result.ATTESTATION_REFUSED
                elif reason.startswith("signer revoked"):
                    result = Result.SIGNER_REVOKED
                device.report(n.campaign, n.attempt, LwState.IDLE, result, detail=reason, finish=True)
            else:
                device.flash.save()
            raise

    def _set_phase(self, job: Job, phase: str) -> None:
        job.phase = phase
        self._phase = phase

    async def _update(self, n: Notice) -> None:
        device, flash = self.device, self.device.flash
        st = flash.state
        existing = st.job if st.job is not None and st.job.key == f"{n.campaign}:{n.attempt}" else None
        if n.envelope is None:
            raise Refusal(Result.UNSUPPORTED_PACKAGE, "update notice without a manifest")
        try:
            env = manifest.decode_envelope(n.envelope)
        except manifest.ManifestError as exc:
            raise Refusal(Result.UNSUPPORTED_PACKAGE, f"manifest: {exc}") from None
        kid = self._kid = self._verify_signer(env)
        if n.revoked and kid in n.revoked:
            raise Refusal(Result.SIGNER_REVOKED, "manifest signed by a revoked key")
        info = env.info
        if info.vendor_id != device.config.vendor_id or info.class_id != device.config.class_id:
            raise Refusal(Result.CONDITION_MISMATCH, "vendor or class identifier does not match")
        if info.sequence <= st.installed_sequence and not (
            device.faults.accept_rollback and info.sequence < st.installed_sequence
        ):
            if info.sequence == st.installed_sequence:
                raise Refusal(Result.UP_TO_DATE, f"sequence {info.sequence} already installed")
            raise Refusal(
                Result.ROLLBACK_REFUSED, f"sequence {info.sequence} is older than {st.installed_sequence}"
            )
        if info.delta is not None and (
            flash.active_digest() != info.delta.base_digest
            or st.slots[st.active].size != info.delta.base_size
        ):
            raise Refusal(Result.BASE_MISMATCH, "the running image is not the patch's base")
        total = sum(c.image_size for c in info.components)
        if total > device.config.flash_size:
            raise Refusal(Result.NOT_ENOUGH_FLASH, f"image of {total} bytes does not fit")
        if device.faults.out_of_memory:
            raise Refusal(Result.OUT_OF_RAM, "simulated: not enough RAM for the update")
        digest = info.image_digest.hex()
        extras = {part_name(c.id): c.image_digest.hex() for c in info.extra_components}
        resume_install = (
            existing is not None
            and existing.phase in ("downloaded", "installing")
            and st.slots[st.inactive].digest == digest
            and st.slots[st.inactive].components == extras
        )
        if existing is not None and existing.digest == digest:
            job = existing
        else:
            job = Job(n.campaign, n.attempt, "downloading", info.sequence, digest, info.image_size)
        job.limits = usage_limits(n.limits)
        if n.extra.get(protocol.NOTICE_PREPARE):
            job.notice = cbor2.dumps(n.to_map()).hex()
        st.job = job
        flash.save()
        await self._step_delay()

        if not resume_install:
            if n.nonce is not None:
                await self._attest(n, env.digest)
            self._set_phase(job, "downloading")
            if info.delta is not None:
                await self._download_delta(n, job, info, info.delta)
            else:
                await self._download_all(n, job, info)
            self._set_phase(job, "downloaded")
            flash.mark_downloaded(digest, info.image_size, info.sequence, extras)
            device.report(n.campaign, n.attempt, LwState.DOWNLOADED, progress=100)
            await self._step_delay()

        if n.extra.get(protocol.NOTICE_PREPARE):
            await self.consent.wait_for_commit(n)
        await self._wait_for_window(n)
        self._set_phase(job, "installing")
        device.report(n.campaign, n.attempt, LwState.UPDATING)
        await self._step_delay()
        if device.faults.install_fail:
            flash.discard_inactive()
            raise Refusal(Result.UPDATE_FAILED, "simulated install failure; previous image kept")
        await device.flush_outbox(5.0)
        self._booted.clear()
        device.request_reboot()
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
        hardware = self.device.config.hardware_id
        if signer.hardware_ids is not None and hardware not in signer.hardware_ids:
            raise Refusal(
                Result.HARDWARE_NOT_LISTED,
                f"developer build of {signer.name!r} is not for hardware {hardware!r}",
            )
        return signer.key_id

    async def _attest(self, n: Notice, manifest_digest: bytes) -> None:
        """Prove this device with its attestation key over the server's nonce, then wait for the
        install token the payload endpoints ask for."""
        assert n.nonce is not None
        if self.attestation.take_token(n):
            return  # attested before a restart: the notice already carries the token
        evidence = self.attestation.evidence(n.nonce, manifest_digest)
        self._phase = "attesting"
        self.device.report(n.campaign, n.attempt, LwState.IDLE, extra={protocol.REPORT_EVIDENCE: evidence})
        await self.attestation.wait_for_token()

    async def _wait_for_window(self, n: Notice) -> None:
        """Download now, install later: keep the downloaded image until the install window opens."""
        if n.window is None:
            return
        delay = n.window[0] - time.time()
        if delay > 0:
            log.info("%s: installing when the window opens in %.0f s", self.name, delay)
            await asyncio.sleep(delay)

    async def _step_delay(self) -> None:
        if self.device.faults.step_delay:
            await asyncio.sleep(self.device.faults.step_delay)

    # -- boot -------------------------------------------------------------------------------

    def switch_slot(self) -> None:
        """The "reboot": the bootloader boots the inactive slot on trial (it holds the verified
        new image), or, after a trial boot that was never confirmed, falls back to the previous."""
        flash = self.device.flash
        job = flash.state.job
        if job is None:
            return
        if job.phase == "installing":
            flash.activate()
            job.phase = "booted"
            log.info("%s: booted slot %s on trial (sequence %d)", self.name, flash.state.active, job.sequence)
        elif job.phase == "booted" and flash.state.trial:
            flash.revert()
            job.phase = "reverted"
            log.info(
                "%s: trial image not confirmed; bootloader reverted to slot %s", self.name, flash.state.active
            )
        else:
            return
        flash.save()
        self.device.status.installed_sequence = flash.state.installed_sequence

    def complete_boot(self) -> None:
        """Once connected after a reboot: on a trial boot run the health check, then confirm the
        image and report SUCCESS, or reset unconfirmed; after a fallback report REVERTED."""
        flash = self.device.flash
        job = flash.state.job
        if job is None:
            return
        if job.phase == "reverted":
            detail = f"trial boot of sequence {job.sequence} failed; running {flash.state.installed_sequence}"
            self.device.report(
                job.campaign, job.attempt, LwState.IDLE, Result.REVERTED, detail=detail, finish=True
            )
            self._booted.set()
            return
        if job.phase != "booted":
            return
        if flash.state.trial and not self._healthy():
            log.info(
                "%s: sequence %d failed its health check; resetting unconfirmed", self.name, job.sequence
            )
            self.device.request_reboot()
            return
        flash.confirm()
        self.consent.begin_usage(job)
        self.device.report(job.campaign, job.attempt, LwState.IDLE, Result.SUCCESS, finish=True)
        self._booted.set()

    def _healthy(self) -> bool:
        """The new image's health check: it booted and reached the server; the ``boot-fail``
        fault makes it fail."""
        return not self.device.faults.boot_fail

    # -- download ---------------------------------------------------------------------------

    async def _download_all(self, n: Notice, job: Job, info: manifest.ManifestInfo) -> None:
        """Fetch and check every image of the update into the inactive slot, one after the other.
        A multi-component update skips an image the slot already holds verified (a restart after
        it was fetched); any failure leaves the whole slot to be discarded, so the components
        install together or not at all."""
        flash = self.device.flash
        several = len(info.components) > 1
        for index, c in enumerate(info.components):
            part = part_name(c.id) if index else ""
            digest = c.image_digest.hex()
            if several and flash.inactive_digest(part) == (digest, c.image_size):
                continue
            await self._download(
                n, job, list(c.uris), digest=digest, size=c.image_size, part=part, report=index == 0
            )
            got, got_size = flash.inactive_digest(part)
            if self.device.faults.skip_digest_check:
                got = digest  # nonconformant: the digest is never compared
            if got_size != c.image_size or got != digest:
                which = f" of component {part_name(c.id)}" if several else ""
                raise Refusal(
                    Result.INTEGRITY_FAILURE, f"image digest/size mismatch{which} ({got_size} bytes)"
                )

    async def _download_delta(
        self, n: Notice, job: Job, info: manifest.ManifestInfo, d: manifest.DeltaPatch
    ) -> None:
        """Fetch the patch (resumable, like an image) beside the inactive slot, check it, apply it
        to the running image into the inactive slot and check the result."""
        flash = self.device.flash
        patch_digest = d.patch_digest.hex()
        if flash.inactive_digest(PATCH_PART) != (patch_digest, d.patch_size):
            await self._download(
                n, job, list(d.uris), digest=patch_digest, size=d.patch_size, part=PATCH_PART
            )
            got, got_size = flash.inactive_digest(PATCH_PART)
            if got_size != d.patch_size or got != patch_digest:
                raise Refusal(Result.INTEGRITY_FAILURE, f"patch digest/size mismatch ({got_size} bytes)")
        try:
            image = delta.apply_patch(
                flash.active_image(),
                flash.read_slot(flash.state.inactive, PATCH_PART),
                expected_size=info.image_size,
            )
        except delta.DeltaError as exc:
            raise Refusal(Result.INTEGRITY_FAILURE, f"patch: {exc}") from None
        flash.write_inactive(image)
        flash.drop_part(PATCH_PART)
        got, got_size = flash.inactive_digest()
        if got_size != info.image_size or got != info.image_digest.hex():
            raise Refusal(Result.INTEGRITY_FAILURE, f"patched image digest/size mismatch ({got_size} bytes)")
        log.info("%s: applied a %d-byte patch for a %d-byte image", self.name, d.patch_size, info.image_size)

    async def _download(
        self,
        n: Notice,
        job: Job,
        uris: list[str],
        *,
        digest: str,
        size: int,
        part: str = "",
        report: bool = True,
    ) -> None:
        """Fetch one image (or a patch) into the inactive slot, resuming from the persisted offset;
        ``report`` the start of the download (once per update)."""
        device, flash, faults = self.device, self.device.flash, self.device.faults
        offset = flash.begin_download(digest, size, part)
        if report:
            device.report(n.campaign, n.attempt, LwState.DOWNLOADING, progress=offset * 100 // max(size, 1))
        candidates = order_uris(uris, device.config.transport)
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
            if faults.corrupt and at <= size // 2 < end:
                i = size // 2 - at
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
            pos = flash.write_chunk(at, chunk)
            if pos - saved >= SAVE_EVERY_BYTES and pos < size:  # the whole image: saved as it ends
                flash.save()
                saved = pos
            if size >= 256 * 1024 and pos * 100 // size >= next_progress and pos < size:
                device.report(n.campaign, n.attempt, LwState.DOWNLOADING, progress=pos * 100 // size)
                next_progress += 25
            fraction = faults.drop_at
            if fraction is not None and not self._dropped_once and pos >= size * fraction and pos < size:
                self._dropped_once = True
                raise _Dropped()
            if faults.throttle_bps:
                await asyncio.sleep(len(chunk) / faults.throttle_bps)

        tries = 0
        permanent: list[str] = []
        while True:
            for uri in [u for u in candidates if u not in permanent]:
                try:
                    await self._fetch(uri, pos, sink)
                except _Dropped:
                    flash.save()
                    log.info("%s: connection dropped at %d/%d bytes; resuming", self.name, pos, size)
                    await device.drop_link()
                    break
                except FetchError as exc:
                    flash.save()
                    log.info("%s: fetch %s failed at %d: %s", self.name, uri, pos, exc)
                    if exc.status in UNAUTHORIZED:
                        raise Refusal(Result.ATTESTATION_REFUSED, f"install token refused: {exc}") from None
                    if exc.permanent:
                        permanent.append(uri)
                    continue
                if pos == size:
                    flash.save()
                    return
                log.info("%s: %s ended early at %d of %d bytes", self.name, uri, pos, size)
            else:
                if len(permanent) == len(candidates):
                    raise Refusal(Result.INVALID_URI, "no payload URI could be fetched")
                tries += 1
                if tries >= self.download_tries:
                    raise Refusal(Result.CONNECTION_LOST, f"download failed {tries} times at {pos}/{size}")
                await asyncio.sleep(min(0.5 * 2**tries, 10.0) * (0.5 + device.rng.random()))

    async def _fetch(self, uri: str, offset: int, sink: Callable[[int, bytes], Awaitable[None]]) -> None:
        clients, token = self.device.clients, self.attestation.token
        if token is not None:
            query = urlencode({"d": f"{self.device.config.tenant}/{self.name}", "t": attestation.b64(token)})
            uri = f"{uri}{'&' if '?' in uri else '?'}{query}"
        if uri.startswith("coap://"):
            async with clients.coap_slots:
                await fetch_coap(await clients.coap(self.name), uri, offset, sink)
        else:
            async with clients.http_slots:
                await fetch_http(uri, offset, sink, timeout=clients.http_timeout)
