"""Delta updates the server makes when a campaign starts.

For each source image the campaign's devices say they run (``devices.image_digest``) and the
tenant uploaded, the server makes a patch to the campaign's image (``fwcm.delta``), stores it as a
payload, and signs a delta manifest with the held key whose approved release is the campaign's
manifest (``fwcm.server.signing.sign_delta``). Patches are made once per (manifest, base) and kept;
at most ``jobs`` run at a time, and a start waits at most ``timeout_s`` for them, outside any
database transaction. A device then gets the delta manifest when its patch is at most the policy's
share of the image; every other device, and one that turns out not to run the base, the full image.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace

from sqlalchemy.orm import Session

from fwcm import delta, manifest
from fwcm.config import Settings
from fwcm.errors import Invalid
from fwcm.keystore import KeyStoreError
from fwcm.rollout.policy import Policy
from fwcm.server import signing
from fwcm.store import campaigns, images
from fwcm.store import deltas as dz
from fwcm.store.db import Database
from fwcm.store.models import Campaign, Manifest
from fwcm.store.payloads import PayloadStore

log = logging.getLogger(__name__)

NO_SIGNER = "its manifest was not signed by this server's signing service, which signs deltas"
STARTABLE = ("draft", "scheduled")
NOT_FOR = "deltas are not made for attested or consent campaigns"


@dataclass(frozen=True)
class Source:
    """What one source image of a starting campaign gets."""

    base: str
    devices: int
    delta_id: int | None = None
    patch_size: int | None = None
    reason: str | None = None
    """Why its devices get the full image (None: they get the patch)."""


@dataclass(frozen=True)
class Plan:
    """The deltas of a starting campaign, written with its start."""

    manifest_id: int
    image_size: int
    sources: tuple[Source, ...]

    def given(self) -> list[Source]:
        return [src for src in self.sources if src.reason is None and src.delta_id is not None]

    def describe(self) -> str:
        used = self.given()
        text = f"deltas: {len(used)} of {len(self.sources)} source images patched"
        if used:
            sizes = ", ".join(f"{src.patch_size:,} bytes for {src.devices}" for src in used)
            text += f" ({sizes} devices; the image is {self.image_size:,} bytes)"
        others = [src for src in self.sources if src.reason is not None]
        reasons = sorted({src.reason for src in others if src.reason})
        if others:
            text += f"; full image for {sum(src.devices for src in others)} devices: {'; '.join(reasons)}"
        return text


class DeltaMaker:
    """Makes and keeps the patches of delta campaigns; one per server, shared by its requests."""

    def __init__(
        self, db: Database, settings: Settings, store: PayloadStore, jobs: int = 2, timeout_s: float = 120.0
    ) -> None:
        self.db = db
        self.settings = settings
        self.store = store
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="fwcm-delta")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def prepare(self, who: signing.Caller, campaign_id: int) -> Plan | None:
        """The deltas of a campaign about to start (None: its policy asks for none). Patches not
        made before are made now; nothing is written to the campaign itself."""
        with self.db.read() as s:
            c = campaigns.get_campaign(s, who.tenant_id, campaign_id)
            share = Policy.from_stored(c.policy or {}).delta_max_share
            if share is None or c.state not in STARTABLE:
                return None  # the start itself refuses a campaign that is not a draft or scheduled
            target = images.get_manifest(s, who.tenant_id, c.manifest_id)
            target_id = target.id
            running = dz.running_images(s, campaigns.targets(c))
            held = dz.held_images(s, who.tenant_id, running)
            known = dz.cached(s, who.tenant_id, target.id)
            key_id = _signer_id(s, who.tenant_id, target.id)
            image_size, image = target.image_size, target.image_digest
            special = _special(c)
        chosen, skipped = delta.sources_to_diff(running, image, held)
        reasons = dict(skipped)
        if special is not None or key_id is None:
            reasons.update(dict.fromkeys(chosen, special or NO_SIGNER))
            chosen = []
        made = self._make_missing(who, target_id, image, [b for b in chosen if b not in known])
        known.update(made)
        out = []
        for base, n in sorted(running.items(), key=lambda kv: (-kv[1], kv[0])):
            if base == image:
                continue
            d = known.get(base)
            reason = reasons.get(base) or _refusal(d, image_size, share)
            out.append(Source(base, n, d.id if d else None, d.patch_size if d else None, reason))
        plan = Plan(target_id, image_size, tuple(out))
        log.info("campaign %d: %s", campaign_id, plan.describe())
        return plan

    def _make_missing(
        self, who: signing.Caller, manifest_id: int, image: str, bases: list[str]
    ) -> dict[str, dz.Made]:
        """Make the patches of these bases in the pool, waiting at most ``timeout_s`` in all, and
        keep each with its signed delta manifest (or why it has none)."""
        jobs: dict[str, Future[tuple[bytes, float]]] = {
            b: self._pool.submit(self._patch, b, image) for b in bases
        }
        deadline = time.monotonic() + self.timeout_s
        out: dict[str, dz.Made] = {}
        for base, job in jobs.items():
            try:
                patch, seconds = job.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                job.cancel()
                out[base] = self._keep(who, manifest_id, base, reason=f"not made within {self.timeout_s:g} s")
                continue
            except (delta.DeltaError, OSError) as exc:
                out[base] = self._keep(who, manifest_id, base, reason=f"cannot make a patch: {exc}"[:200])
                continue
            out[base] = self._keep(who, manifest_id, base, patch=patch, seconds=seconds)
        return out

    def _patch(self, base: str, image: str) -> tuple[bytes, float]:
        t0 = time.monotonic()
        with self.store.open(base) as old, self.store.open(image) as new:
            patch = delta.make_patch(old.read(), new.read())
        return patch, time.monotonic() - t0

    def _keep(
        self,
        who: signing.Caller,
        manifest_id: int,
        base: str,
        *,
        patch: bytes | None = None,
        seconds: float | None = None,
        reason: str | None = None,
    ) -> dz.Made:
        """Store a made patch as a payload with its signed delta manifest, or why there is none."""
        sha = hashlib.sha256(patch).hexdigest() if patch is not None else None
        if patch is not None:
            self.store.write_chunks([patch], len(patch))
        with self.db.session() as s:
            target = images.get_manifest(s, who.tenant_id, manifest_id)
            fields: dict[str, object] = {
                "tenant_id": who.tenant_id,
                "manifest_id": manifest_id,
                "base_digest": base,
                "image_size": target.image_size,
                "seconds": seconds,
            }
            if patch is None or sha is None:
                return dz.record(s, **fields, state=dz.SKIPPED, reason=reason)
            images.record_payload(
                s, who.tenant_id, sha, len(patch), f"patch {base[:12]} to {target.image_digest[:12]}"
            )
            try:
                signed = self._sign(s, who, target, base, sha, len(patch))
            except (KeyStoreError, Invalid, signing.Refused) as exc:
                log.warning("patch from %s… to manifest %d: not signed: %s", base[:12], manifest_id, exc)
                return dz.record(
                    s, **fields, state=dz.SKIPPED, reason=f"cannot sign its manifest: {exc}"[:200]
                )
            log.info(
                "patch from %s… to %s…: %d bytes (%.0f%% of the image) in %.2f s",
                base[:12],
                target.image_digest[:12],
                len(patch),
                100.0 * len(patch) / max(target.image_size, 1),
                seconds or 0.0,
            )
            return dz.record(
                s,
                **fields,
                state=dz.READY,
                patch_digest=sha,
                patch_size=len(patch),
                delta_manifest_id=signed,
            )

    def _sign(self, s: Session, who: signing.Caller, target: Manifest, base: str, sha: str, size: int) -> int:
        info = manifest.decode_envelope(target.envelope).info
        key = signing.delta_signer(s, who.tenant_id, target.id)
        if key is None:
            raise signing.Refused(NO_SIGNER)
        base_size = self.store.size(base)
        uris = (f"{self.settings.public_http_url}/p/{sha}", f"{self.settings.public_coap_url}/p/{sha}")
        patch = manifest.DeltaPatch(bytes.fromhex(base), base_size, bytes.fromhex(sha), size, uris)
        made = replace(info, uris=(), delta=patch)
        return signing.sign_delta(
            s,
            self.settings.keystore(),
            who,
            self.settings.root_cert(),
            key,
            info,
            made,
            self.settings.max_manifest_bytes,
        )


def _signer_id(s: Session, tenant_id: int, manifest_id: int) -> int | None:
    key = signing.delta_signer(s, tenant_id, manifest_id)
    return None if key is None else key.id


def _special(c: Campaign) -> str | None:
    return NOT_FOR if c.attestation or c.consent is not None else None


def _refusal(d: dz.Made | None, image_size: int, share: float) -> str | None:
    """Why a source's devices get the full image although a patch was tried (None: the patch)."""
    if d is None:
        return None
    if d.state != dz.READY or d.patch_size is None or d.delta_manifest_id is None:
        return d.reason or "no patch"
    if not delta.worth_sending(d.patch_size, image_size, share / 100.0):
        pct = 100.0 * d.patch_size / max(image_size, 1)
        return f"the patch is {pct:.0f}% of the image, above the policy's {share:g}%"
    return None
